"""The tiny teacher and the tiny PRM: local stand-ins for study C's distillation teacher and
process reward model, built without downloads on the tiny task and cached like the tiny base.

- ``build_tiny_teacher()``: a Qwen3 with the tiny base's tokenizer but a different size
  (hidden 96 against 64), warm-started on *correct* answers (no forgetful teacher), so it
  carries where the base forgets: the distillation reward points at the right sums.
- ``build_tiny_prm()``: a Math-Shepherd-style causal-LM PRM. It starts from the tiny base's
  weights (which know the sums, if forgetfully) and learns to answer ``"+"`` or ``"-"`` after
  the step tag ``"#"`` for completions split at ``"{"`` (the tiny task's two steps:
  ``"\\boxed{"``, always right, then ``"85}"``, right when the sum is). Its training answers are
  correct half the time, the no-carry answer a quarter, a nearby wrong sum the rest.

Each lives in ``<cache>/tiny-teacher-<hash>`` / ``<cache>/tiny-prm-<hash>`` (``tiny_model``'s
cache root), written under a temporary name and renamed when complete. ``steps`` overrides the
recipe's training steps (tests pass a handful; 0 keeps the initial weights).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

from lora_engine.rl import tiny_model as tm
from lora_engine.rl.prm import PRM_FILE, tagged_input
from lora_engine.rl.tasks.tiny import forgot_carry, format_completion, make_problems, operands

TEACHER_RECIPE = {
    "version": 1, "seed": 1, "forget_carry_p": 0.0,
    "model": {**tm.TINY_RECIPE["model"], "hidden_size": 96, "intermediate_size": 384, "head_dim": 24},
    # 1,000 steps of 128 at hidden 96 (one thread): about 80 s on this machine's shared cores.
    "train": {**tm.TINY_RECIPE["train"], "steps": 1000},
}
PRM_META = {"kind": "math_shepherd", "step_tag": "#", "good": "+", "bad": "-", "separator": "{"}
PRM_RECIPE = {
    "version": 1, "seed": 2, "init": "base", "meta": PRM_META,
    "train": {"steps": 600, "batch_size": 128, "lr": 1e-3, "n_problems": 20000},
}


def _root(cache_dir) -> Path:
    return tm.cache_path(cache_dir).parent


def _cached(kind: str, recipe: dict, cache_dir, force: bool, build) -> str:
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = _root(cache_dir) / f"tiny-{kind}-{digest}"
    done = path / tm.RECIPE_FILE
    if done.exists() and not force:
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(min(tm.BUILD_THREADS, threads))
        record = build(tmp)
        (tmp / tm.RECIPE_FILE).write_text(json.dumps({"recipe": recipe, **record}, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:
            if not done.exists():
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def _recipe(recipe: dict, steps: int | None) -> dict:
    out = json.loads(json.dumps(recipe))
    if steps is not None:
        if steps < 0:
            raise ValueError(f"steps must be >= 0 (0 keeps the initial weights), got {steps}")
        out["train"]["steps"] = steps
    return out


def build_tiny_teacher(cache_dir=None, force: bool = False, steps: int | None = None, progress: bool = True) -> str:
    """Path of the tiny teacher (model + the tiny base's tokenizer), built first if absent."""
    spec = _recipe(TEACHER_RECIPE, steps)

    def build(tmp: Path) -> dict:
        tok = tm.build_tokenizer()
        model = tm.make_model(tok, spec["seed"], sizes=spec["model"])
        losses = tm.warm_start(model, tok, seed=spec["seed"], p_forget=spec["forget_carry_p"], progress=progress,
                               **spec["train"]) if spec["train"]["steps"] else []
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return {"final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None}

    return _cached("teacher", spec, cache_dir, force, build)


def prm_examples(n: int, seed: int, tokenizer) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """``n`` judged completions of train problems: (input ids, tag positions, label ids per tag)."""
    rng = random.Random(seed)
    good, bad = (tokenizer(PRM_META[k], add_special_tokens=False)["input_ids"][0] for k in ("good", "bad"))
    seqs, ats, labels = [], [], []
    for p in make_problems(n, seed=seed, split="train"):
        x, y = operands(p["prompt"])
        u = rng.random()
        if u < 0.75:
            answer = x + y if u < 0.5 else forgot_carry(x, y)
        else:  # a nearby wrong sum (one draw only here: the stream the cached recipe was built with)
            answer = max(0, x + y + rng.choice([-11, -10, -1, 1, 9, 10]))
        steps = ["\\boxed{", format_completion(str(answer))[len("\\boxed{"):]]
        ids, at = tagged_input(tokenizer, p["prompt"], steps, PRM_META["step_tag"], PRM_META["separator"])
        seqs.append(ids)
        ats.append(at)
        labels.append([good, good if answer == x + y else bad])
    return seqs, ats, labels


def build_tiny_prm(cache_dir=None, force: bool = False, steps: int | None = None, progress: bool = True,
                   init: str | None = None) -> str:
    """Path of the tiny PRM (model, tokenizer, ``prm.json``), built first if absent. ``init``:
    ``"base"`` (the recipe's: fine-tune the tiny base) or ``"random"`` (a fresh tiny Qwen3, no base
    needed: for tests)."""
    spec = _recipe(PRM_RECIPE, steps)
    if init is not None:
        if init not in ("base", "random"):
            raise ValueError(f"init must be 'base' or 'random', got {init!r}")
        spec["init"] = init

    def build(tmp: Path) -> dict:
        from transformers import AutoModelForCausalLM
        tok = tm.build_tokenizer()
        if spec["init"] == "base":
            model = AutoModelForCausalLM.from_pretrained(tm.build_tiny_model(cache_dir, progress=progress))
        else:
            model = tm.make_model(tok, spec["seed"])
        tr = spec["train"]
        seqs, ats, labels = prm_examples(min(tr["n_problems"], tr["steps"] * tr["batch_size"]), spec["seed"], tok)
        g = torch.Generator().manual_seed(spec["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=tr["lr"], weight_decay=0.01)
        model.train()
        losses = []
        for _ in range(tr["steps"]):
            idx = torch.randint(0, len(seqs), (tr["batch_size"],), generator=g).tolist()
            L = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), L), tok.pad_token_id, dtype=torch.long)
            att = torch.zeros_like(ids)
            target = torch.full_like(ids, -100)
            for j, i in enumerate(idx):
                ids[j, :len(seqs[i])], att[j, :len(seqs[i])] = torch.tensor(seqs[i]), 1
                target[j, ats[i]] = torch.tensor(labels[i])
            logits = model(input_ids=ids, attention_mask=att).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / PRM_FILE).write_text(json.dumps(PRM_META, indent=2) + "\n")
        return {"final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None}

    return _cached("prm", spec, cache_dir, force, build)
