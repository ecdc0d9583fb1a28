"""Correctness of completions against gold answers: math-verify (the default), exact match, or
reasoning-gym's own scorer.

The answer is read with an ordered list of extractors (``answers.make_extractor``: boxed, then
``<answer>`` tags by default; ``last_number`` only if asked). With ``math_verify`` only the
extracted answer is checked, in the sandboxed ``verifier`` pool with a deadline per check; a
completion that hangs the checker (``\\boxed{9^{9^{9^{9}}}}``) scores 0 and is counted as a
timeout.

Golds that are words are compared as strings, not by math-verify, and counted as ``skipped``:
math-verify reads a word as a product of one-letter symbols, so it scores "silent" equal to
"listen" (measured, math-verify 0.9), which would reward wrong answers on reasoning-gym's word
tasks. A gold is a word when it has no digit and, LaTeX commands (``\\frac``, ``\\text``...)
aside, two letters in a row. A gold math-verify cannot parse at all is compared as a string
too (open-r1 skips such samples instead: reward None).

``reasoning_gym`` uses the dataset's ``score_answer``, which is not binary (for gold -4, "-4.0"
scores 0.5 in basic_arithmetic): use it when you want its partial credit.
"""
from __future__ import annotations

import re
from typing import Sequence

from lora_engine.rl import rewards
from lora_engine.rl.answers import make_extractor

SCORERS = ("auto", "math_verify", "exact", "reasoning_gym")
DEFAULT_EXTRACTORS = ("boxed", "answer_tag")


class AnswerScorer:
    """``scorer(problems, completions, stats=None) -> list[float]`` (1.0 correct, 0.0 not).

    Problems are dicts with ``prompt`` and ``answer`` (the gold as a string) and, for the
    ``reasoning_gym`` scorer, ``entry``. ``stats``: a ``rewards.RewardStats`` or one per sample.
    """

    def __init__(self, kind: str = "math_verify", extractors: str | Sequence[str] = DEFAULT_EXTRACTORS,
                 timeout: float = 5.0, dataset: str | None = None):
        if kind not in SCORERS or kind == "auto":
            raise ValueError(f"scorer must be one of {SCORERS[1:]} (or \"auto\" in a config), got {kind!r}")
        if timeout <= 0:
            raise ValueError(f"verify_timeout must be > 0 seconds, got {timeout}")
        if kind == "reasoning_gym" and dataset is None:
            raise ValueError("scorer = \"reasoning_gym\" needs a reasoning-gym task: "
                             "task = \"reasoning_gym:<dataset>\"")
        self.kind, self.timeout = kind, float(timeout)
        self.extract = make_extractor(extractors)
        self._rg = rewards.reasoning_gym_reward(dataset, extract=self.extract) if kind == "reasoning_gym" else None

    def __call__(self, problems: Sequence[dict], completions: Sequence[str], stats=None) -> list[float]:
        prompts = [p["prompt"] for p in problems]
        golds = [str(p["answer"]) for p in problems]
        if self.kind == "reasoning_gym":
            out = self._rg(prompts, completions, golds, entries=[p.get("entry") for p in problems], stats=stats)
            return [float(r) for r in out]
        if self.kind == "exact":
            return [float(_exact(self.extract(c), g)) for c, g in zip(completions, golds)]
        words = [is_word(g) for g in golds]
        # A word gold goes to the checker as "" (skipped there, never parsed), then by string.
        out = rewards.math_verify_reward(prompts, completions, ["" if w else g for g, w in zip(golds, words)],
                                         extract=self.extract, timeout=self.timeout, stats=stats)
        # None: a word, or no mathematics in the gold (counted as skipped): compare strings.
        return [float(_exact(self.extract(c), g)) if r is None else float(r)
                for r, c, g in zip(out, completions, golds)]


_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_WORD_RE = re.compile(r"[A-Za-z]{2}")


def is_word(gold: str) -> bool:
    """Whether a gold answer is text rather than mathematics: no digit, and two letters in a row
    outside LaTeX commands. ``"Paris"`` and ``"listen"`` are; ``"x^2 + 1"``, ``"\\frac{\\pi}{2}"``
    and ``"5\\text{ cm}"`` (a number with its unit, which math-verify normalises) are not."""
    return not any(ch.isdigit() for ch in gold) and bool(_WORD_RE.search(_LATEX_COMMAND_RE.sub(" ", gold)))


def _exact(pred: str | None, gold: str) -> bool:
    return pred is not None and pred.strip() == gold.strip()
