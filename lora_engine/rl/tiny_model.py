"""The embedded default base model: a tiny Qwen3 warm-started on two-term sums, built locally.

``build_tiny_model()`` needs no downloads: it builds a character-level tokenizer and a small
Qwen3 from a fixed seed, teaches it the task of ``lora_engine.rl.tasks.tiny`` by a short
teacher-forced run on train problems, and caches model + tokenizer in
``<cache>/tiny-<hash of the recipe>`` (``<cache>``: ``cache_dir``, else ``$LORA_ENGINE_CACHE``,
else ``~/.cache/lora-engine``), loadable offline with ``AutoModelForCausalLM`` /
``AutoTokenizer``. The warm-start targets come from a forgetful teacher (see ``tiny_task``),
so held-out accuracy is partial and GRPO with LoRA adapters has room to raise it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
import tempfile
from pathlib import Path

import torch

from lora_engine.rl.tasks.tiny import (
    BOXED, DATASET, DATASET_KWARGS, FORGET_CARRY_P, format_completion, make_problems, score, teacher_answer,
)

__all__ = ["TINY_RECIPE", "build_tiny_model", "build_tokenizer", "evaluate", "make_problems", "score"]

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
# Printable ASCII and newline, so any plain text round-trips; "\boxed{" is one token so the
# answer format costs one decode step instead of seven.
CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"
RECIPE_FILE = "tiny_recipe.json"
# One thread: 39 ms per warm-start step at batch 128 against 26 ms on two idle cores, but
# 56 ms against 191 ms when another process holds a core (at this size OpenMP threads mostly
# wait on each other). A fixed count also keeps the float reduction order, hence the weights,
# independent of the machine's core count.
BUILD_THREADS = 1
TINY_RECIPE = {
    # Bump "version" when the recipe's meaning changes without its values changing.
    "version": 1,
    "seed": 0,
    "task": {"dataset": DATASET, **{k: list(v) if isinstance(v, tuple) else v for k, v in DATASET_KWARGS.items()},
             "forget_carry_p": FORGET_CARRY_P},
    "model": {
        # 144k parameters: 2 layers, hidden 64, 4 heads of 16. Full (not grouped) key-value heads
        # keep every target module at least 64 wide, so LoRA ranks 1..64 fit everywhere.
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # 1,200 steps of 128: ~60 s on one core, to a loss of 0.077 nats/token against a floor of
    # ~0.04 set by the forgetful teacher's 80/20 coin on carry problems.
    "train": {"steps": 1200, "batch_size": 128, "lr": 3e-3, "warmup": 100, "weight_decay": 0.01,
              "n_problems": 20000},
}


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: 4 specials, ``\\boxed{``, printable ASCII.

    No BOS is prepended (as for Qwen3): prompts are fed as they are. Pads on the left, for
    batched generation.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = list(SPECIAL_TOKENS.values()) + [BOXED] + list(CHARS)
    backend = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(vocab)}, unk_token="<unk>"))
    # "[\s\S]" rather than ".": the regex dot does not match "\n".
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS.values()))
    backend.add_tokens([BOXED])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_RECIPE["model"]["max_position_embeddings"],
        **SPECIAL_TOKENS,
    )


def make_model(tokenizer, seed: int = TINY_RECIPE["seed"], sizes: dict | None = None):
    """A randomly initialised Qwen3 of the recipe's size (or ``sizes``, Qwen3Config fields) for
    ``tokenizer`` (seeded, RNG-neutral)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **(TINY_RECIPE["model"] if sizes is None else sizes),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = config.pad_token_id, config.bos_token_id, config.eos_token_id
    return model


def encode_examples(tokenizer, prompts: list[str], answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids [B, L]`` of prompt + completion + EOS, and ``labels [B, L]``.

    Labels are -100 on the prompt and the padding: only the completion is taught, as in SFT.
    """
    rows, label_rows = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(format_completion(answer), add_special_tokens=False)["input_ids"]
        completion_ids.append(tokenizer.eos_token_id)
        rows.append(prompt_ids + completion_ids)
        label_rows.append([-100] * len(prompt_ids) + completion_ids)
    L = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), L), -100, dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(label_row)] = torch.tensor(label_row)
    return input_ids, labels


def warm_start(model, tokenizer, *, steps: int, batch_size: int, lr: float, warmup: int, weight_decay: float,
               n_problems: int, seed: int, p_forget: float = FORGET_CARRY_P, progress: bool = True) -> list[float]:
    """Teacher-forced training on the forgetful teacher's answers; returns the loss per step.

    The teacher forgets the carry with probability ``p_forget`` (``tiny_task.teacher_answer``).
    AdamW, linear warmup over ``warmup`` steps then cosine decay to 10% of ``lr``; batches are
    drawn with a seeded generator, so the result depends only on the arguments (and the
    thread count).
    """
    from tqdm.auto import tqdm

    problems = make_problems(n_problems, seed=seed, split="train")
    rng = random.Random(seed)
    answers = [teacher_answer(p, rng, p_forget) for p in problems]
    input_ids, labels = encode_examples(tokenizer, [p["prompt"] for p in problems], answers)
    attention_mask = (input_ids != tokenizer.pad_token_id).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1.0 + torch.cos(torch.tensor(frac * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="warm-starting the tiny model", disable=not progress)
    for step in bar:
        idx = torch.randint(0, input_ids.shape[0], (batch_size,), generator=generator)
        loss = model(input_ids=input_ids[idx], attention_mask=attention_mask[idx], labels=labels[idx]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def evaluate(model, tokenizer, problems: list[dict], greedy: bool = True, n: int = 1, max_new_tokens: int = 8,
             temperature: float = 1.0, batch_size: int = 512, seed: int = 0) -> float:
    """Mean ``score`` over ``problems`` x ``n`` completions from Hugging Face ``model.generate``.

    ``greedy`` decodes argmax (n identical completions: use n=1); otherwise samples at
    ``temperature`` with no top-k/top-p truncation, seeded by ``seed`` (RNG-neutral for the
    caller). ``max_new_tokens=8`` covers the longest completion, ``\\boxed{`` + "200" + "}" +
    EOS = 6 tokens.
    """
    if not problems:
        raise ValueError("problems is empty: pass at least one problem from make_problems")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}; use greedy=True instead")
    sample_kwargs = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature,
                                                          "top_k": 0, "top_p": 1.0}
    was_training = model.training
    model.eval()
    repeated = [p for p in problems for _ in range(n)]
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(repeated), batch_size):
            chunk = repeated[start : start + batch_size]
            enc = tokenizer([p["prompt"] for p in chunk], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=False).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **sample_kwargs)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            total += sum(score(text, p) for text, p in zip(texts, chunk))
    model.train(was_training)
    return total / len(repeated)


def recipe(steps: int | None = None) -> dict:
    """``TINY_RECIPE``, with the warm-start ``steps`` overridden when given."""
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0 (0 saves the random-init model), got {steps}")
    out = json.loads(json.dumps(TINY_RECIPE))
    if steps is not None:
        out["train"]["steps"] = steps
    return out


def cache_path(cache_dir: str | os.PathLike | None = None, steps: int | None = None) -> Path:
    """Where ``build_tiny_model`` keeps the model for this recipe: ``<cache>/tiny-<12 hex>``."""
    root = cache_dir or os.environ.get("LORA_ENGINE_CACHE") or Path.home() / ".cache" / "lora-engine"
    digest = hashlib.sha256(json.dumps(recipe(steps), sort_keys=True).encode()).hexdigest()[:12]
    return Path(root).expanduser() / f"tiny-{digest}"


def build_tiny_model(cache_dir: str | os.PathLike | None = None, force: bool = False, steps: int | None = None,
                     progress: bool = True, eval_problems: int = 200) -> str:
    """Path of the cached tiny model + tokenizer, building it first if absent (or ``force``).

    The build (~1 min on one CPU core, no downloads): tokenizer, seeded Qwen3, ``steps``
    warm-start steps (default ``TINY_RECIPE["train"]["steps"]``; tests pass a handful), then a
    held-out check of ``eval_problems`` problems (greedy and T=1 sampled accuracy), written with
    the recipe to ``tiny_recipe.json``. The directory is written under a temporary name and
    renamed, so a reader never sees a half-written model and concurrent builders are safe.
    """
    path = cache_path(cache_dir, steps)
    if path.joinpath(RECIPE_FILE).exists() and not force:
        return str(path)
    spec = recipe(steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(min(BUILD_THREADS, threads))
        tokenizer = build_tokenizer()
        model = make_model(tokenizer, spec["seed"])
        losses = warm_start(model, tokenizer, seed=spec["seed"], p_forget=spec["task"]["forget_carry_p"],
                            progress=progress, **spec["train"])
        record = {"recipe": spec, "final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None}
        if eval_problems:
            held_out = make_problems(eval_problems, seed=spec["seed"], split="eval")
            record["eval_problems"] = eval_problems
            record["eval_greedy_accuracy"] = evaluate(model, tokenizer, held_out, greedy=True)
            record["eval_sampled_accuracy"] = evaluate(model, tokenizer, held_out, greedy=False, n=8)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.joinpath(RECIPE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if path.exists() and (force or not path.joinpath(RECIPE_FILE).exists()):
            shutil.rmtree(path)  # replaced on request, or left incomplete by hand
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.joinpath(RECIPE_FILE).exists():
                raise  # not a concurrent builder that finished first: a real failure
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
