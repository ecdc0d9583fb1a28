"""Rewards for RL from verifiable rewards, and the pass@k / avg@k evaluation metrics.

The one reward signature
------------------------
Every reward function, built-in or user-written, is a plain callable::

    reward_fn(prompts: list[str], completions: list[str], answers: list[str], **kw)
        -> list[float | None]

- ``prompts[i]``, ``completions[i]``, ``answers[i]`` describe sample ``i`` (the answer is the
  gold reference as a string); all three lists have the same length N and so does the result.
- ``None`` means "skip this sample" (no learning signal, e.g. the gold answer cannot be parsed);
  the trainer masks it out instead of treating it as reward 0.
- ``**kw`` carries optional extras; a function ignores what it does not use. The built-ins read:
  ``stats`` (a :class:`RewardStats` that counts skips, errors and timeouts of this call),
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
``errors``, ``timeouts``; ``errors`` includes ``timeouts``). The trainer creates one
``RewardStats`` per step, passes it to its reward function and logs ``stats.as_dict()``.
Configuration mistakes (mismatched list lengths, an unknown dataset, a missing package) do
raise ``ValueError``/``ImportError`` at once: they are bugs, not data.

Bounded time from any thread
----------------------------
math-verify's own timeout uses ``signal.alarm``, which only works in the main thread and cannot
interrupt C code. We disable it (``parsing_timeout=None``, ``timeout_seconds=None``) and run
every check in a small pool of persistent worker processes (:class:`VerifyPool`): each check
has a wall-clock deadline; a worker that misses it is killed and replaced. The workers are
plain ``python -c`` subprocesses that load only this file (no torch, no CUDA state, no
re-import of the user's ``__main__``), talk JSON lines over pipes, and exit when the parent
closes their stdin. POSIX only (``select`` on pipes).

This module imports only the standard library at top level, so the workers start in ~0.5 s
(the time to import math-verify and sympy).
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable, Sequence

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


def _stats(kw: dict) -> RewardStats:
    """The caller's counter, or a throwaway one when the caller did not ask for counts."""
    stats = kw.get("stats")
    return stats if stats is not None else RewardStats()


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

_BOXED_RE = re.compile(r"\\boxed\s*\{")


def _top_level_boxes(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, content)`` of each outermost ``\\boxed{...}``, left to right.

    Braces are counted so ``\\boxed{\\frac{1}{2}}`` yields ``\\frac{1}{2}``; a backslash escapes
    the next character, so ``\\{`` and ``\\}`` (set braces) do not count. An unclosed box is
    not a box.
    """
    boxes = []
    pos = 0
    while True:
        m = _BOXED_RE.search(text, pos)
        if m is None:
            return boxes
        depth, i = 1, m.end()
        while i < len(text) and depth > 0:
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            i += 1
        if depth != 0:
            # Unclosed: its text may still hold a later, well-formed box.
            pos = m.end()
            continue
        boxes.append((m.start(), i, text[m.end():i - 1]))
        pos = i


def extract_boxed(text: str) -> str | None:
    """Content of the last outermost ``\\boxed{...}`` in ``text``, or None if there is none.

    Nested braces are handled (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``) and a box that only
    wraps another box is unwrapped (``\\boxed{\\boxed{3}}`` -> ``3``).
    """
    if not isinstance(text, str):
        return None
    boxes = _top_level_boxes(text)
    if not boxes:
        return None
    content = boxes[-1][2].strip()
    inner = _top_level_boxes(content)
    while len(inner) == 1 and inner[0][0] == 0 and inner[0][1] == len(content):
        content = inner[0][2].strip()
        inner = _top_level_boxes(content)
    return content


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
    stats = _stats(kw)
    out: list[float | None] = []
    for c in completions:
        if not isinstance(c, str):
            stats.add("errors")
            c = ""
        count = sum(1 for _, _, b in _top_level_boxes(c) if b.strip())
        out.append(bonus if count == 1 else missing if count == 0 else multiple)
    stats.add("samples", n)
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
        _stats(kw).add("samples", n)
        return [-coef * min(max(L - soft, 0), buffer) / buffer if L <= max_len else -coef
                for L in lengths]

    penalty.__name__ = f"length_penalty_{max_len}"
    return penalty


# --- math-verify outcome reward -----------------------------------------------------------

def _worker_main() -> None:
    """Worker loop: one JSON request per stdin line -> one JSON reply per stdout line.

    Request ``{"gold": str, "pred": str}``; reply ``{"value": 1.0 | 0.0 | null}`` (null: gold
    unparsable) or ``{"error": "ExceptionName"}``.
    """
    # Replies go to a private copy of stdout; fd 1 is pointed at stderr so that a library that
    # prints cannot corrupt the protocol stream.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    # math-verify warns once that its timeout is off; the parent enforces one.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    limit_mb = int(os.environ.get("LORA_ENGINE_VERIFY_MEM_MB", "0"))
    if limit_mb > 0:
        # A runaway big-integer power can eat the host's memory before the deadline kills it.
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # The prediction: a \boxed answer wins over other matches, and bare LaTeX without an
    # "answer is"/box anchor is not read (as in open-r1's accuracy reward); math-verify's default
    # normalisation strips units and \text and repairs \frac12-style operators.
    pred_config = [
        LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
        ExprExtractionConfig(),
    ]
    # The gold is usually a bare answer; math anywhere in it counts.
    gold_config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    delimited = re.compile(r"\\boxed|(?<!\\)\$|\\\(|\\\[")
    gold_cache: dict[str, list] = {}

    def parse_gold(gold: str) -> list:
        """Parsed gold, or [] when it holds no mathematical object (string fallbacks only)."""
        if gold not in gold_cache:
            # A bare gold is parsed as a boxed answer: read as plain text, "x^2 + 1" would
            # yield its last number, 1.
            text = gold if delimited.search(gold) else "\\boxed{" + gold + "}"
            parsed = parse(text, extraction_config=gold_config, parsing_timeout=None)
            if len(gold_cache) > 4096:
                gold_cache.clear()
            gold_cache[gold] = parsed if any(not isinstance(p, str) for p in parsed) else []
        return gold_cache[gold]

    out.write('{"ready": true}\n')
    for line in sys.stdin:
        try:
            req = json.loads(line)
            gold = parse_gold(req["gold"])
            if not gold:
                reply = {"value": None}
            else:
                pred = parse(req["pred"], extraction_config=pred_config, parsing_timeout=None)
                ok = bool(pred) and verify(gold, pred, timeout_seconds=None)
                reply = {"value": 1.0 if ok else 0.0}
        except Exception as e:  # noqa: BLE001 - any failure is one counted error, never a crash
            # str(e) can itself hang on a huge sympy object; the type name is enough.
            reply = {"error": type(e).__name__}
        out.write(json.dumps(reply) + "\n")


_WORKER_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_lora_engine_verify_worker', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod._worker_main()\n"
)


class _Worker:
    """One subprocess and the single check it is running (if any)."""

    def __init__(self, mem_mb: int) -> None:
        env = dict(os.environ, LORA_ENGINE_VERIFY_MEM_MB=str(mem_mb))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0

    def send(self, task: int, msg: dict, deadline: float) -> bool:
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        self.task, self.deadline = task, deadline
        return True

    def read_lines(self) -> list[dict] | None:
        """Complete replies available now; None once the worker has exited."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        try:
            return [json.loads(x) for x in lines if x.strip()]
        except ValueError:
            return None  # a garbled stream: treat the worker as dead and replace it

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the worker's loop ends at EOF
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class VerifyPool:
    """Persistent math-verify workers with a wall-clock deadline per check.

    Callable from any thread; concurrent calls are served one after the other. Workers start on
    first use (~0.5 s, in parallel) and are restarted after a timeout or a crash; the deadline
    of a check starts when it is sent to a ready worker, so start-up time never counts.
    ``mem_mb`` caps each worker's address space (0: no cap).
    """

    BOOT_TIMEOUT_S = 120.0

    def __init__(self, workers: int | None = None, mem_mb: int = 8192) -> None:
        self.n_workers = workers or min(4, os.cpu_count() or 1)
        if self.n_workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.mem_mb = mem_mb
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._pid = os.getpid()
        self._booted = False  # a worker has started once: later start-up failures are transient
        atexit.register(self.close)

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.close()
            self._workers = []

    def _start(self) -> None:
        # A forked child must not share its parent's pipes: start fresh workers.
        if self._pid != os.getpid():
            self._workers, self._pid = [], os.getpid()
        self._workers = [w for w in self._workers if w.proc.poll() is None]
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker(self.mem_mb))

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self.mem_mb)

    def check(
        self, pairs: Sequence[tuple[str, str]], timeout: float
    ) -> list[tuple[str, float | None]]:
        """Verify each ``(gold, prediction)`` pair.

        Returns one ``(status, value)`` per pair: ``("ok", 1.0 | 0.0)``, ``("skip", None)`` for
        an unparsable gold, ``("timeout", None)`` or ``("error", None)``.
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        results: list = [None] * len(pairs)
        if not pairs:
            return results
        with self._lock:
            try:
                return self._run(pairs, timeout, results)
            except BaseException:
                # Workers with a check in flight would answer it during the next call.
                for w in self._workers:
                    w.kill()
                self._workers = []
                raise

    def _run(self, pairs, timeout: float, results: list) -> list:
        """Keep every ready worker busy, collect replies, replace workers past their deadline."""
        self._start()
        pending = deque(range(len(pairs)))
        boot_deadline = time.monotonic() + self.BOOT_TIMEOUT_S
        while pending or any(w.task is not None for w in self._workers):
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    gold, pred = pairs[i]
                    if not w.send(i, {"gold": gold, "pred": pred}, now + timeout):
                        pending.appendleft(i)
                        self._replace(w)
            waiting = [w for w in self._workers if w.task is not None or not w.ready]
            if not any(w.ready for w in self._workers) and now > boot_deadline:
                raise RuntimeError(
                    f"math-verify workers did not start within {self.BOOT_TIMEOUT_S:.0f} s; "
                    f"check that `{sys.executable} -c 'import math_verify'` works"
                )
            wake = min([w.deadline for w in waiting if w.task is not None] + [now + 1.0])
            fds = [w.fd for w in waiting]
            readable, _, _ = select.select(fds, [], [], max(0.0, wake - now))
            for w in [w for w in waiting if w.fd in readable]:
                replies = w.read_lines()
                if replies is None:
                    self._on_exit(w, results)
                    continue
                for reply in replies:
                    if not w.ready:
                        w.ready = self._booted = True
                    elif "error" in reply:
                        results[w.task], w.task = ("error", None), None
                    elif reply["value"] is None:
                        results[w.task], w.task = ("skip", None), None
                    else:
                        results[w.task], w.task = ("ok", reply["value"]), None
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now >= w.deadline:
                    results[w.task] = ("timeout", None)
                    self._replace(w)
        return results

    def _on_exit(self, w: _Worker, results: list) -> None:
        """A worker died: its check is an error (e.g. a segfault in deep recursion)."""
        if not w.ready and not self._booted:
            w.kill()
            raise RuntimeError(
                f"a math-verify worker exited during start-up (code {w.proc.returncode}); "
                f"check that `{sys.executable} -c 'import math_verify'` works"
            )
        if w.task is not None:
            results[w.task] = ("error", None)
        self._replace(w)


_DEFAULT_POOL: VerifyPool | None = None
_DEFAULT_POOL_LOCK = threading.Lock()


def default_verify_pool() -> VerifyPool:
    """The process-wide pool used when ``math_verify_reward`` gets no ``pool=``."""
    global _DEFAULT_POOL
    with _DEFAULT_POOL_LOCK:
        if _DEFAULT_POOL is None:
            import importlib.util

            if importlib.util.find_spec("math_verify") is None:
                raise ImportError(
                    "math_verify_reward needs math-verify: pip install 'math-verify>=0.7'"
                )
            _DEFAULT_POOL = VerifyPool()
        return _DEFAULT_POOL


def math_verify_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str],
    *,
    timeout: float = 5.0,
    pool: VerifyPool | None = None,
    **kw,
) -> list[float | None]:
    """Binary correctness with math-verify: 1.0 if the completion's answer equals the gold.

    The gold is parsed first: a bare gold such as ``x^2 + 1`` as ``\\boxed{x^2 + 1}``, a gold
    with its own ``$``/``\\(``/``\\[``/``\\boxed`` delimiters (a worked solution) as it is; if it
    yields no mathematical object (``""``, ``\\frac{``) the sample is skipped (None). The
    prediction is parsed with a ``\\boxed`` answer taking priority and units/``\\text``
    normalised away, so
    ``\\boxed{5\\text{ cm}}`` matches gold ``5``. Each check (gold parse + prediction parse +
    verify) gets ``timeout`` seconds in a worker process; a timeout, a crash or a non-string
    completion gives 0.0 and is counted in ``stats`` (see the module docstring).
    """
    n = _check_lengths(prompts, completions, answers)
    stats = _stats(kw)
    rewards: list[float | None] = [0.0] * n
    pairs, where = [], []
    for i, (c, a) in enumerate(zip(completions, answers)):
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str) or not a.strip():
            rewards[i] = None
            stats.add("skipped")
        elif not isinstance(c, str):
            stats.add("errors")
        else:
            pairs.append((a, c))
            where.append(i)
    for i, (status, value) in zip(where, (pool or default_verify_pool()).check(pairs, timeout)):
        if status == "ok":
            rewards[i] = value
        elif status == "skip":
            rewards[i] = None
            stats.add("skipped")
        else:
            stats.add("errors")
            if status == "timeout":
                stats.add("timeouts")
                logger.warning("math-verify check %d timed out after %.1f s (reward 0)", i, timeout)
    stats.add("samples", n)
    return rewards


# --- reasoning-gym task scorers -------------------------------------------------------------

_ANSWER_TAG_RE = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The last ``<answer>...</answer>`` (reasoning-gym's convention), else the last box."""
    if not isinstance(completion, str):
        return None
    tags = _ANSWER_TAG_RE.findall(completion)
    return tags[-1].strip() if tags else extract_boxed(completion)


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
        stats = _stats(kw)
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
                stats.add("errors")
                out.append(0.0)
        stats.add("samples", n)
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


# --- evaluation metrics -----------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1..n} (1 - k / i)`` (Chen et al. 2021), which never forms the
    binomials (C(200, 100) ~ 9e58 overflows float arithmetic long before n gets large).
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(scores: Sequence[float], k: int | None = None) -> float:
    """avg@k: mean score of the first ``k`` samples of one problem (all of them if k is None).

    Average the result over problems for a benchmark number, as for pass@k.
    """
    k = len(scores) if k is None else k
    if not 1 <= k <= len(scores):
        raise ValueError(f"avg_at_k needs 1 <= k <= len(scores)={len(scores)}, got k={k}")
    return float(sum(float(s) for s in scores[:k]) / k)
