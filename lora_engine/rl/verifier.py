"""The sandboxed answer checker: math-verify in a pool of worker processes with a deadline per check.

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
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Sequence

logger = logging.getLogger(__name__)


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
