"""Correctness of completions against gold answers: math-verify (the default), exact match, or
reasoning-gym's own scorer.

The answer is read with an ordered list of extractors (``answers.make_extractor``: boxed, then
``<answer>`` tags by default; ``last_number`` only if asked). With ``math_verify`` only the
extracted answer is checked, in the sandboxed ``verifier`` pool with a deadline per check; a
completion that hangs the checker (``\\boxed{9^{9^{9^{9}}}}``) scores 0 and is counted as a
timeout. A gold that math-verify cannot read as mathematics (a word, a list of names from a
reasoning-gym puzzle) is compared as a string instead and counted as ``skipped``, so the
default works for non-math datasets too; open-r1 skips such samples instead (reward None).

``reasoning_gym`` uses the dataset's ``score_answer``, which is not binary (for gold -4, "-4.0"
scores 0.5 in basic_arithmetic): use it when you want its partial credit.
"""
from __future__ import annotations

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
            raise ValueError("scorer = \"reasoning_gym\" needs a reasoning-gym task: task = \"reasoning_gym:<dataset>\"")
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
        out = rewards.math_verify_reward(prompts, completions, golds, extract=self.extract, timeout=self.timeout,
                                         stats=stats)
        # None: math-verify found no mathematics in the gold (counted as skipped): compare strings.
        return [float(_exact(self.extract(c), g)) if r is None else float(r)
                for r, c, g in zip(out, completions, golds)]


def _exact(pred: str | None, gold: str) -> bool:
    return pred is not None and pred.strip() == gold.strip()
