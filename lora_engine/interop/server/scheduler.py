"""Futures, per-model ordering and the batching queue: the engine thread that runs every request.

One thread owns the model (torch work blocks; the HTTP event loop must not). Each turn of its
loop takes, under one lock:

1. control tasks (create a model, load one from a checkpoint, drop a finished session's models);
2. at most one non-batchable op (optim_step, save, load) at the head of each model's queue;
3. one forward/backward batch: models with a forward or forward_backward at their head, least
   recently served first, one op per model per round, rounds repeated while the token cap
   allows (``max_batch_tokens``; the first op always fits). A client flooding its model with
   requests therefore adds one op per round, like everyone else, and a model that waited
   longest is served first: nobody starves. The batch is ONE base forward + backward
   (``Backend.run_fwdbwd``);
4. one sampling batch: queued sample requests, sessions served least recently first, up to
   ``max_sample_rows`` sequences, decoded together (``Backend.run_samples``).

Per model, ops run in the SDK's ``seq_id`` order (1, 2, 3...; chunks of one call arrive out of
order by design); a gap (a client that never sends seq n) stalls only that model. A resubmit of
a seen ``(model_id, seq_id)`` with the same body gets the first request id back (idempotent
retries); with another body, a 400. Futures are resolved on the event loop's thread, once: a
second resolution is counted in ``stats["resolved_twice"]`` and ignored (the load test checks
it stays 0).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("lora_engine.serve")
SEEN_KEEP = 4096  # resubmit window: seq_ids per model remembered for idempotent retries


class UserError(ValueError):
    """A request that cannot succeed as sent: its future fails with category "user"."""


@dataclass
class Future:
    request_id: str
    session_id: str
    kind: str
    event: asyncio.Event = field(default_factory=asyncio.Event)
    result: tuple | None = None  # ("json", dict) | ("proto", bytes) | ("error", message, category)
    retrieved_at: float | None = None


class FutureTable:
    """request id -> Future. ``new`` and reads on the event loop; ``resolve`` from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._futures: dict[str, Future] = {}
        self.stats: Counter = Counter()

    def new(self, session_id: str, kind: str) -> Future:
        fut = Future(f"req-{secrets.token_hex(16)}", session_id, kind)  # unguessable: the id is the capability
        self._futures[fut.request_id] = fut
        self.stats["created"] += 1
        return fut

    def get(self, request_id: str) -> Future | None:
        return self._futures.get(request_id)

    def resolve(self, fut: Future, result: tuple) -> None:
        self._loop.call_soon_threadsafe(self._set, fut, result)

    def _set(self, fut: Future, result: tuple) -> None:
        if fut.result is not None:
            self.stats["resolved_twice"] += 1
            return
        fut.result = result
        fut.event.set()
        self.stats["resolved"] += 1
        self.stats["failed" if result[0] == "error" else "succeeded"] += 1

    def sweep(self, keep_retrieved_s: float, ended_sessions: set[str]) -> None:
        """Forget futures read more than ``keep_retrieved_s`` ago (a client re-polls within seconds
        after a timeout) and those of ended sessions."""
        now = time.monotonic()
        for rid, fut in list(self._futures.items()):
            old = fut.retrieved_at is not None and now - fut.retrieved_at > keep_retrieved_s
            if old or (fut.session_id in ended_sessions and fut.result is not None):
                del self._futures[rid]

    @property
    def pending(self) -> int:
        return sum(f.result is None for f in self._futures.values())


@dataclass
class Task:
    kind: str                 # fwdbwd | optim | save_state | save_sampler | load | control | sample
    payload: Any
    future: Future | None = None
    tokens: int = 0           # what it costs against the batch caps
    digest: str = ""          # resubmit check


@dataclass
class ModelQueue:
    model_id: str
    session_id: str
    next_seq: int = 1
    pending: dict[int, Task] = field(default_factory=dict)
    seen: dict[int, tuple[str, str]] = field(default_factory=dict)  # seq -> (digest, request id or error)
    last_served: int = 0
    dead: bool = False

    def head(self) -> Task | None:
        return self.pending.get(self.next_seq)

    def pop(self) -> Task:
        task = self.pending.pop(self.next_seq)
        self.next_seq += 1
        return task


class Scheduler:
    """The queues and the engine thread; ``backend`` does the work (see ``backend.Backend``)."""

    def __init__(self, backend, futures: FutureTable, *, max_batch_tokens: int, max_sample_rows: int,
                 max_pending_per_model: int = 256, max_queued_sample_rows: int = 8192):
        self.backend, self.futures = backend, futures
        self.max_batch_tokens, self.max_sample_rows = max_batch_tokens, max_sample_rows
        self.max_pending, self.max_queued_rows = max_pending_per_model, max_queued_sample_rows
        self.models: dict[str, ModelQueue] = {}
        self._control: deque[Task] = deque()
        self._samples: dict[str, deque[Task]] = {}   # session id -> its queued sample requests
        self._sample_served: dict[str, int] = {}
        self._queued_rows = 0
        self._turn = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._paused = False
        self._thread = threading.Thread(target=self._loop, name="lora-engine-serve", daemon=True)
        self.stats: Counter = Counter()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def pause(self) -> None:
        """Start no new turn until ``resume`` (requests still queue): for maintenance, and for
        tests that need several requests in one batch deterministically."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def queued(self) -> int:
        """Requests waiting: sequenced ops (a gap's later ops included), control tasks, samples."""
        with self._cond:
            return (sum(len(mq.pending) for mq in self.models.values()) + len(self._control)
                    + sum(len(q) for q in self._samples.values()))

    # -- submitting (event loop thread) ------------------------------------------------------------
    def add_model(self, model_id: str, session_id: str) -> ModelQueue:
        with self._cond:
            return self.models.setdefault(model_id, ModelQueue(model_id, session_id))

    def submit_seq(self, model_id: str, seq_id: int, digest: str, make_task=None, error: str | None = None) -> str:
        """Queue ``make_task()`` as op ``seq_id`` of ``model_id``; returns its request id. A
        resubmit (same ``digest``) returns the first request id and makes nothing. ``error``
        (no make_task): the request was invalid; its seq_id is used up so the model's later ops
        still run, and a resubmit raises the same error."""
        with self._cond:
            mq = self.models.get(model_id)
            if mq is None or mq.dead:
                raise UserError(f"unknown model_id {model_id!r} (its session ended, or the server restarted)")
            if not isinstance(seq_id, int) or isinstance(seq_id, bool):
                raise UserError("seq_id must be an integer")
            if seq_id in mq.seen:
                first_digest, answer = mq.seen[seq_id]
                if first_digest != digest:
                    raise UserError(f"seq_id {seq_id} of {model_id} was already submitted with another body: "
                                    "a retry must resend the same request")
                if answer.startswith("error:"):
                    raise UserError(answer[len("error:"):])
                return answer
            if not mq.next_seq <= seq_id < mq.next_seq + self.max_pending:
                raise UserError(f"seq_id {seq_id} is outside this model's window [{mq.next_seq}, "
                                f"{mq.next_seq + self.max_pending}): wait for earlier requests first")
            if error is not None:
                mq.seen[seq_id] = (digest, f"error:{error}")
                mq.pending[seq_id] = Task("skip", None)
            else:
                task = make_task()
                mq.seen[seq_id] = (digest, task.future.request_id)
                mq.pending[seq_id] = task
            for old in [s for s in mq.seen if s < mq.next_seq - SEEN_KEEP]:
                del mq.seen[old]
            self._cond.notify_all()
        if error is not None:
            raise UserError(error)
        return task.future.request_id

    def submit_control(self, task: Task) -> None:
        with self._cond:
            self._control.append(task)
            self._cond.notify_all()

    def submit_sample(self, session_id: str, rows: int, make_task) -> Task:
        """Queue ``make_task()`` (a sample request of ``rows`` sequences) for ``session_id``;
        ``OverflowError`` when too many are queued (the server answers 429: back off)."""
        with self._cond:
            if self._queued_rows and self._queued_rows + rows > self.max_queued_rows:
                raise OverflowError(f"{self._queued_rows} sequences are queued for sampling: retry shortly")
            task = make_task()
            self._samples.setdefault(session_id, deque()).append(task)
            self._queued_rows += rows
            self._cond.notify_all()
        return task

    def end_session(self, session_id: str) -> list[str]:
        """Stop the session's models: their queued ops fail, their adapters are freed (by a
        control task, after whatever the engine is running now). Returns the model ids."""
        dropped, failed = [], []
        with self._cond:
            for mid, mq in list(self.models.items()):
                if mq.session_id == session_id:
                    mq.dead = True
                    failed += [t for t in mq.pending.values() if t.future is not None]
                    del self.models[mid]
                    dropped.append(mid)
            for t in self._samples.pop(session_id, ()):
                self._queued_rows -= t.tokens
                failed.append(t)
            self._control.append(Task("control", ("drop_session", session_id, dropped)))
            self._cond.notify_all()
        for t in failed:
            self.futures.resolve(t.future, ("error", "the session ended before this request ran", "user"))
        return dropped

    # -- the engine thread -------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self._control or self._queued_rows or any(mq.head() for mq in self.models.values()))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._paused or not self._has_work()):
                    self._cond.wait(timeout=1.0)
                if self._stopping:
                    return
                self._turn += 1
                control = list(self._control)
                self._control.clear()
                heads = self._pop_heads()
                batch = self._pop_batch()
                samples = self._pop_samples()
            t0 = time.perf_counter()
            for task in control + heads:
                self._run(task, lambda t=task: self.backend.run_one(t))
            t1 = time.perf_counter()
            if batch:
                self.stats["fwdbwd_batches"] += 1
                self.stats["fwdbwd_requests"] += len(batch)
                self.stats["max_models_per_batch"] = max(self.stats["max_models_per_batch"],
                                                         len({mid for mid, _ in batch}))
                self._run_many([t for _, t in batch], lambda: self.backend.run_fwdbwd(batch))
            t2 = time.perf_counter()
            if samples:
                self.stats["sample_batches"] += 1
                self.stats["sample_requests"] += len(samples)
                self._run_many(samples, lambda: self.backend.run_samples(samples))
            t3 = time.perf_counter()
            for name, dt in (("other_s", t1 - t0), ("fwdbwd_s", t2 - t1), ("sample_s", t3 - t2)):
                self.stats[name] = round(self.stats[name] + dt, 3)

    def _pop_heads(self) -> list[Task]:
        out = []
        for mq in self.models.values():
            head = mq.head()
            while head is not None and head.kind == "skip":  # an invalid request's seq_id
                mq.pop()
                head = mq.head()
            if head is not None and head.kind != "fwdbwd":
                out.append(mq.pop())
        return out

    def _pop_batch(self) -> list[tuple[str, Task]]:
        order = sorted((mq for mq in self.models.values() if mq.head() is not None and mq.head().kind == "fwdbwd"),
                       key=lambda mq: mq.last_served)
        batch: list[tuple[str, Task]] = []
        tokens, progress = 0, True
        while progress:
            progress = False
            for mq in order:
                head = mq.head()
                if head is None or head.kind != "fwdbwd":
                    continue
                if batch and tokens + head.tokens > self.max_batch_tokens:
                    continue
                batch.append((mq.model_id, mq.pop()))
                tokens += head.tokens
                mq.last_served = self._turn
                progress = True
        return batch

    def _pop_samples(self) -> list[Task]:
        order = sorted((s for s, q in self._samples.items() if q), key=lambda s: self._sample_served.get(s, 0))
        out, rows, progress = [], 0, True
        while progress:
            progress = False
            for sid in order:
                q = self._samples[sid]
                if not q or (out and rows + q[0].tokens > self.max_sample_rows):
                    continue
                task = q.popleft()
                out.append(task)
                rows += task.tokens
                self._queued_rows -= task.tokens
                self._sample_served[sid] = self._turn
                progress = True
        for sid in [s for s, q in self._samples.items() if not q]:
            del self._samples[sid]
        return out

    def _run(self, task: Task, fn) -> None:
        try:
            result = fn()
        except ValueError as e:  # lora-engine's "bad input, here is the fix" (UserError included)
            result = ("error", str(e), "user")
        except Exception as e:  # a bug or a resource error: report it, keep serving everyone else
            log.exception("request failed")
            result = ("error", f"server error: {type(e).__name__}: {e}", "server")
        if task.future is not None:
            self.futures.resolve(task.future, result)

    def _run_many(self, tasks: list[Task], fn) -> None:
        """Run a batch; ``fn`` returns one result (or a UserError) per task, in order."""
        try:
            results = fn()
        except Exception as e:
            log.exception("batch failed")
            results = [("error", f"server error: {type(e).__name__}: {e}", "server")] * len(tasks)
        for task, result in zip(tasks, results):
            if isinstance(result, ValueError):
                result = ("error", str(result), "user")
            self.futures.resolve(task.future, result)
