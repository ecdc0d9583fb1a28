"""What a task is, and the shared machinery of the data-backed ones (reasoning-gym, math files).

The protocol the trainer relies on::

    task.sample_train(n, generator) -> list[problem]     # seeded: the adapter's own generator
    task.eval_set(n) -> list[problem]                     # the first n held-out problems, fixed
    task.encode_prompt(tokenizer, problem) -> list[int]
    task.score(problems, completions) -> list[float]      # 1.0 correct, 0.0 not

A problem is a dict with at least ``prompt`` (the question) and ``answer`` (the gold as a
string). Optional: ``score(..., stats=...)`` to count verifier timeouts and errors (one
``rewards.RewardStats`` or one per sample) and ``stop_token_ids(tokenizer)`` for the tokens that
end a reply; ``score_problems`` and ``stop_ids`` call them when a task has them.

Held-out splits are made by a stable hash of the question text mixed with the data seed, so a
question never lands in both splits (procedural generators repeat questions; files do too) and
the split does not move when ``eval_problems`` changes.
"""
from __future__ import annotations

import hashlib
import inspect
from typing import Sequence

import torch

from lora_engine.rl.answers import worked_solution
from lora_engine.rl.prompts import PromptFormat
from lora_engine.rl.tasks.scoring import AnswerScorer

EVAL_FRACTION = 0.1  # share of distinct questions held out when a task has no separate eval data


def in_eval_split(question: str, seed: int, fraction: float) -> bool:
    """Whether ``question`` belongs to the held-out split (stable: a hash of seed and text)."""
    digest = hashlib.sha256(f"{seed}\x00{question}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"task_options.eval_fraction must be a number in (0, 1), got {fraction!r}")
    return float(fraction)


class DataTask:
    """A task over lists of problems: seeded sampling, prompt rendering, scoring, few-shot turns.

    Subclasses fill ``self.train`` and ``self.eval`` (lists of problem dicts) and then call
    ``self._finish(...)``.
    """

    train: list[dict]
    eval: list[dict]

    def _finish(self, name: str, prompt: PromptFormat | None, scorer: AnswerScorer, few_shot: int = 0,
                seed: int = 0) -> None:
        if not self.train:
            raise ValueError(f"task {name!r} has no training problems: check its data and field names")
        prompt = prompt or PromptFormat()
        if few_shot < 0 or few_shot >= len(self.train):
            raise ValueError(f"few_shot must be in [0, {len(self.train) - 1}] for task {name!r}, got {few_shot}")
        if few_shot:
            # The shots are fixed (by the data seed) and leave the training pool, so the policy
            # is never trained on a problem whose solution its prompt shows.
            order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed)).tolist()
            shots = [self.train[i] for i in order[:few_shot]]
            self.train = [self.train[i] for i in sorted(order[few_shot:])]
            examples = tuple((p["prompt"], worked_solution(p.get("solution", p["answer"]), p["answer"]))
                             for p in shots)
            prompt = PromptFormat(**{**prompt.__dict__, "few_shot": prompt.few_shot + examples})
        self.name, self.prompt, self.scorer = name, prompt, scorer

    def sample_train(self, n: int, generator: torch.Generator) -> list[dict]:
        idx = torch.randint(0, len(self.train), (n,), generator=generator).tolist()
        return [self.train[i] for i in idx]

    def eval_set(self, n: int) -> list[dict]:
        return self.eval[:n]

    def encode_prompt(self, tokenizer, problem: dict) -> list[int]:
        return self.prompt.encode(tokenizer, problem["prompt"])

    def stop_token_ids(self, tokenizer) -> list[int]:
        return self.prompt.stop_token_ids(tokenizer)

    def score(self, problems: Sequence[dict], completions: Sequence[str], stats=None) -> list[float]:
        return self.scorer(problems, completions, stats=stats)


def score_problems(task, problems, completions, stats=None) -> list[float]:
    """``task.score``, passing ``stats`` when the task's ``score`` takes it (user tasks may not)."""
    if stats is not None and "stats" in inspect.signature(task.score).parameters:
        return task.score(problems, completions, stats=stats)
    return task.score(problems, completions)


def stop_ids(task, tokenizer) -> list[int]:
    """The tokens that end a reply: the task's own, else the tokenizer's EOS."""
    fn = getattr(task, "stop_token_ids", None)
    return list(fn(tokenizer)) if fn is not None else [tokenizer.eos_token_id]
