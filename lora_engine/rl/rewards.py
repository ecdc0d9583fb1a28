"""Reward functions for RL from verifiable rewards (the sandboxed checker is ``verifier``; the
pass@k / avg@k evaluation metrics are ``metrics``).

The one reward signature
------------------------
Every reward function, built-in or user-written, is a plain callable::

    reward_fn(prompts: list[str], completions: list[str], answers: list[str], **kw)
        -> list[float | None]

- ``prompts[i]``, ``completions[i]``, ``answers[i]`` describe sample ``i`` (the answer is the
  gold reference as a string); all three lists have the same length N and so does the result.
- ``None`` means "skip this sample" (no learning signal, e.g. the gold answer cannot be parsed);
  a caller should mask it out rather than read it as reward 0.
- ``**kw`` carries optional extras; a function ignores what it does not use. The built-ins read:
  ``stats`` (a :class:`RewardStats` that counts skips, errors and timeouts of this call, or a
  list with one per sample: the trainer passes each sample's adapter's counter),
  ``completion_lengths`` (token counts, for :func:`length_penalty`) and ``entries``
  (reasoning-gym entries, for :func:`reasoning_gym_reward`).

Configure a built-in with ``functools.partial`` (``partial(boxed_format_reward, bonus=0.2)``)
or with its factory (:func:`length_penalty`, :func:`reasoning_gym_reward`), and sum several
with :func:`combine`.

Errors are counted, never raised mid-run
----------------------------------------
A reward call must not stop a training run. A check that hangs (``\\boxed{9^{9^{9^{9}}}}``
makes sympy compute a number with ~10^8 digits), crashes or receives a non-string gets reward 0
and is counted in the ``stats`` object passed as ``stats=`` (fields: ``samples``, ``skipped``,
``errors``, ``timeouts``; ``errors`` includes ``timeouts``): a caller that wants the counts
creates one ``RewardStats`` per step, passes it and logs ``stats.as_dict()``.
Configuration mistakes (mismatched list lengths, an unknown dataset, a missing package) do
raise ``ValueError``/``ImportError`` at once: they are bugs, not data.

Bounded time from any thread
----------------------------
math-verify's own timeout uses ``signal.alarm``, which only works in the main thread and cannot
interrupt C code: :func:`math_verify_reward` runs every check in ``verifier.VerifyPool``, worker
processes with a wall-clock deadline per check.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Callable, Sequence

from lora_engine.rl import verifier
from lora_engine.rl.answers import count_boxes, extract_answer, extract_boxed  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

RewardFn = Callable[..., "list[float | None]"]


# --- error and skip counters --------------------------------------------------------------

class RewardStats:
    """Thread-safe counters for one reward call (or one training step).

    ``samples``: samples seen (each built-in part of a :func:`combine` counts its own);
    ``skipped``: rewards returned as None; ``errors``: samples that got reward 0 because their
    check failed (crash, malformed input or timeout); ``timeouts``: the subset of ``errors``
    that ran out of time.
    """

    FIELDS = ("samples", "skipped", "errors", "timeouts")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)

    def add(self, field: str, n: int = 1) -> None:
        if field not in self._counts:
            raise ValueError(f"unknown RewardStats field {field!r}; use one of {self.FIELDS}")
        with self._lock:
            self._counts[field] += n

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> dict[str, int]:
        """Return the counts and zero them (one call per logged step)."""
        with self._lock:
            out = dict(self._counts)
            self._counts = dict.fromkeys(self.FIELDS, 0)
            return out

    def __getattr__(self, name: str) -> int:
        if name in RewardStats.FIELDS:
            return self.as_dict()[name]
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"RewardStats({self.as_dict()})"


def _sinks(kw: dict, n: int) -> list[RewardStats]:
    """One counter per sample. ``stats=`` is one ``RewardStats`` for the whole call, or a list with
    one per sample (the trainer passes each sample's adapter's counter, so counts are per
    adapter); absent, the counts go to a throwaway counter."""
    stats = kw.get("stats")
    if stats is None or isinstance(stats, RewardStats):
        return [stats if stats is not None else RewardStats()] * n
    if len(stats) != n:
        raise ValueError(f"stats has {len(stats)} counters for {n} samples: pass one RewardStats or one per sample")
    return list(stats)


def _count(sinks: list[RewardStats], field: str) -> None:
    for s in sinks:
        s.add(field)


def _check_lengths(prompts, completions, answers) -> int:
    n = len(completions)
    if len(prompts) != n or len(answers) != n:
        raise ValueError(
            f"reward inputs must have one entry per sample: got {len(prompts)} prompts, "
            f"{n} completions, {len(answers)} answers; repeat each prompt and answer once per "
            "completion"
        )
    return n


# --- boxed answers ------------------------------------------------------------------------

def boxed_format_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str],
    *,
    bonus: float = 0.1,
    missing: float = -0.1,
    multiple: float = 0.0,
    **kw,
) -> list[float | None]:
    """Format term: ``bonus`` for exactly one non-empty outermost ``\\boxed{...}``, ``missing``
    when there is none, ``multiple`` when there are several (a hedged answer).

    Boxes nested in a box count once (``\\boxed{\\boxed{3}}`` is one answer); an empty
    ``\\boxed{}`` is not an answer. A non-string completion counts as an error and as missing.
    """
    n = _check_lengths(prompts, completions, answers)
    sinks = _sinks(kw, n)
    out: list[float | None] = []
    for c, sink in zip(completions, sinks):
        if not isinstance(c, str):
            sink.add("errors")
        count = count_boxes(c)
        out.append(bonus if count == 1 else missing if count == 0 else multiple)
    _count(sinks, "samples")
    return out


# --- length penalty -----------------------------------------------------------------------

def length_penalty(
    max_len: int,
    buffer: int | None = None,
    coef: float = 0.1,
    length_fn: Callable[[str], int] | None = None,
) -> RewardFn:
    """Build a soft overlong penalty (DAPO's, scaled by ``coef``).

    With ``L`` the completion length and ``soft = max_len - buffer``::

        r(L) = 0                              if L <= soft
             = -coef * (L - soft) / buffer    if soft < L <= max_len
             = -coef                          if L > max_len

    DAPO uses ``coef = 1`` (max 20480, buffer 4096); the default 0.1 keeps it a light
    regulariser beside a 0/1 correctness reward. ``buffer`` defaults to ``max_len // 5``.
    Lengths come from ``completion_lengths=[...]`` (token counts, passed by the trainer) or,
    when that is absent, from ``length_fn(completion)`` (then ``max_len`` is in its units).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    buffer = max(1, max_len // 5) if buffer is None else buffer
    if not 1 <= buffer <= max_len:
        raise ValueError(f"buffer must be in [1, max_len={max_len}], got {buffer}")
    soft = max_len - buffer

    def penalty(prompts, completions, answers, **kw) -> list[float | None]:
        n = _check_lengths(prompts, completions, answers)
        lengths = kw.get("completion_lengths")
        if lengths is None:
            if length_fn is None:
                raise ValueError(
                    "length_penalty needs lengths: pass completion_lengths=[token counts] to the "
                    "call, or build it with length_penalty(max_len, length_fn=len)"
                )
            lengths = [length_fn(c) for c in completions]
        if len(lengths) != n:
            raise ValueError(f"completion_lengths has {len(lengths)} entries for {n} completions")
        _count(_sinks(kw, n), "samples")
        return [-coef * min(max(L - soft, 0), buffer) / buffer if L <= max_len else -coef
                for L in lengths]

    penalty.__name__ = f"length_penalty_{max_len}"
    return penalty


# --- math-verify outcome reward -----------------------------------------------------------

def math_verify_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str],
    *,
    timeout: float = 5.0,
    pool: verifier.VerifyPool | None = None,
    extract: Callable[[str], str | None] | None = None,
    **kw,
) -> list[float | None]:
    """Binary correctness with math-verify: 1.0 if the completion's answer equals the gold.

    The gold is parsed first: a bare gold such as ``x^2 + 1`` as ``\\boxed{x^2 + 1}``, a gold
    with its own ``$``/``\\(``/``\\[``/``\\boxed`` delimiters (a worked solution) as it is; if it
    yields no mathematical object (``""``, ``\\frac{``) the sample is skipped (None).

    The prediction: with ``extract`` (an ``answers.make_extractor``), its answer is read first
    and only that is verified (as ``\\boxed{answer}``); a completion with no answer gets 0.0
    without a check. Without it the whole completion goes to math-verify, a ``\\boxed`` answer
    taking priority (as in open-r1's accuracy reward) but any last expression counting too.
    Units/``\\text`` are normalised away, so ``\\boxed{5\\text{ cm}}`` matches gold ``5``. Each
    check (gold parse + prediction parse + verify) gets ``timeout`` seconds in a worker process;
    a timeout, a crash or a non-string completion gives 0.0 and is counted in ``stats`` (see
    the module docstring).
    """
    n = _check_lengths(prompts, completions, answers)
    sinks = _sinks(kw, n)
    rewards: list[float | None] = [0.0] * n
    pairs, where = [], []
    for i, (c, a) in enumerate(zip(completions, answers)):
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str) or not a.strip():
            rewards[i] = None
            sinks[i].add("skipped")
        elif not isinstance(c, str):
            sinks[i].add("errors")
        elif extract is None:
            pairs.append((a, c))
            where.append(i)
        else:
            pred = extract(c)
            if pred is not None:
                pairs.append((a, "\\boxed{" + pred + "}"))
                where.append(i)
    for i, (status, value) in zip(where, (pool or verifier.default_verify_pool()).check(pairs, timeout)):
        if status == "ok":
            rewards[i] = value
        elif status == "skip":
            rewards[i] = None
            sinks[i].add("skipped")
        else:
            sinks[i].add("errors")
            if status == "timeout":
                sinks[i].add("timeouts")
                logger.warning("math-verify check %d timed out after %.1f s (reward 0)", i, timeout)
    _count(sinks, "samples")
    return rewards


# --- reasoning-gym task scorers -------------------------------------------------------------

def reasoning_gym_reward(
    dataset_name: str, extract: Callable[[str], str | None] = extract_answer
) -> RewardFn:
    """Build a reward from reasoning-gym's scorer for ``dataset_name`` (e.g. ``"chain_sum"``).

    The returned function extracts each completion's answer with ``extract`` and scores it with
    ``score_answer(answer, entry)`` when ``entries=[...]`` (the dataset's entry dicts, with
    their metadata) is passed, since many tasks need the metadata to score. Without entries, or
    for an entry that is None, it falls back to exact match of the stripped answer string
    against ``answers[i]``. A scorer that raises gives 0.0 and a counted error.
    """
    try:
        import reasoning_gym
    except ImportError as e:
        raise ImportError(
            "reasoning_gym_reward needs reasoning-gym: pip install reasoning-gym"
        ) from e
    score_answer = reasoning_gym.get_score_answer_fn(dataset_name)  # ValueError if unknown

    def reward(prompts, completions, answers, **kw) -> list[float | None]:
        n = _check_lengths(prompts, completions, answers)
        entries = kw.get("entries")
        if entries is not None and len(entries) != n:
            raise ValueError(
                f"entries has {len(entries)} items for {n} completions; pass one per completion"
            )
        sinks = _sinks(kw, n)
        out: list[float | None] = []
        for i, (c, gold) in enumerate(zip(completions, answers)):
            pred = extract(c)
            entry = entries[i] if entries is not None else None
            if entry is None:
                out.append(float(pred is not None and pred.strip() == str(gold).strip()))
                continue
            try:
                out.append(float(score_answer(pred, entry)))
            except Exception:  # noqa: BLE001 - a scorer bug on one sample must not stop the run
                sinks[i].add("errors")
                out.append(0.0)
        _count(sinks, "samples")
        return out

    reward.__name__ = f"reasoning_gym_{dataset_name}"
    return reward


# --- combining ------------------------------------------------------------------------------

def combine(*weighted_fns) -> RewardFn:
    """Sum reward functions with weights: ``combine((1.0, f), (0.1, g), h)`` (bare = weight 1).

    The result has the same signature and forwards ``**kw`` to every part. A sample that any
    part skips (None) is skipped in the sum.
    """
    if not weighted_fns:
        raise ValueError(
            "combine needs at least one reward function, e.g. combine((1.0, math_verify_reward))"
        )
    parts = []
    for item in weighted_fns:
        w, fn = (1.0, item) if callable(item) else (None, None)
        if isinstance(item, tuple) and len(item) == 2:
            w, fn = item
        if not callable(fn) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(
                f"combine takes reward functions or (weight, function) pairs, got {item!r}"
            )
        parts.append((float(w), fn))

    def combined(prompts, completions, answers, **kw) -> list[float | None]:
        n = _check_lengths(prompts, completions, answers)
        total: list[float | None] = [0.0] * n
        for w, fn in parts:
            out = fn(prompts, completions, answers, **kw)
            if len(out) != n:
                name = getattr(fn, "__name__", fn)
                raise ValueError(f"reward function {name!r} returned {len(out)} values for {n} samples")
            total = [None if t is None or r is None else t + w * float(r)
                     for t, r in zip(total, out)]
        return total

    combined.__name__ = "combined_reward"
    return combined


# --- study A's reward -----------------------------------------------------------------------

def study_reward(problems, completions, correct, lengths, weights) -> dict[str, list[float]]:
    """The weighted parts of study A's reward per sample: ``correct`` (correct_weight x the
    task's 1/0), ``format`` (format_weight x :func:`boxed_format_reward`) and ``length``
    (:func:`length_penalty` with coef length_weight over the last length_buffer tokens before
    max_new_tokens). ``weights`` is anything with those fields (a ``TrainConfig``); a part whose
    weight is 0 is all zeros. The reward is the sum of the parts.
    """
    prompts, golds = [p["prompt"] for p in problems], [p["answer"] for p in problems]
    n = _check_lengths(prompts, completions, golds)
    parts = {"correct": [weights.correct_weight * float(c) for c in correct], "format": [0.0] * n,
             "length": [0.0] * n}
    if weights.format_weight:
        parts["format"] = [weights.format_weight * f for f in boxed_format_reward(prompts, completions, golds)]
    if weights.length_weight:
        pen = length_penalty(weights.max_new_tokens, buffer=weights.length_buffer or None, coef=weights.length_weight)
        parts["length"] = pen(prompts, completions, golds, completion_lengths=list(lengths))
    return parts
