"""The serve queue without HTTP or a model: seq_id order per model, idempotent resubmits, an
invalid request using up its seq_id, token-capped batches, and fairness (a flood from one client
cannot starve another), for training and for sampling."""
import asyncio
import threading
import time

import pytest

pytest.importorskip("fastapi")

from lora_engine.interop.server.scheduler import FutureTable, Scheduler, Task, UserError  # noqa: E402


class RecordingBackend:
    """Records what the engine thread was asked to run; every request succeeds."""

    def __init__(self):
        self.calls, self.lock = [], threading.Lock()

    def run_one(self, task):
        with self.lock:
            self.calls.append(("one", task.payload))
        return ("json", {"ran": task.payload})

    def run_fwdbwd(self, batch):
        with self.lock:
            self.calls.append(("batch", [t.payload for _, t in batch]))
        return [("json", {"ran": t.payload}) for _, t in batch]

    def run_samples(self, tasks):
        with self.lock:
            self.calls.append(("samples", [t.payload for t in tasks]))
        return [("json", {"ran": t.payload}) for t in tasks]


@pytest.fixture
def queue():
    loop = asyncio.new_event_loop()
    futures = FutureTable(loop)
    backend = RecordingBackend()
    sched = Scheduler(backend, futures, max_batch_tokens=20, max_sample_rows=8)
    sched.pause()
    sched.start()
    yield sched, backend, futures, loop
    sched.stop()
    loop.close()


def _submit(sched, futures, model, seq, kind="fwdbwd", tokens=10, payload=None, digest=None):
    payload = payload or f"{model}:{seq}"
    return sched.submit_seq(model, seq, digest or payload, lambda: Task(kind, payload, futures.new("s", kind), tokens))


def _drain(sched, futures, loop, n_expected):
    sched.resume()
    deadline = time.time() + 10
    while futures.stats["resolved"] < n_expected and time.time() < deadline:
        loop.run_until_complete(asyncio.sleep(0.01))  # resolutions are delivered on the loop
    assert futures.stats["resolved"] == n_expected and futures.stats["resolved_twice"] == 0


def test_ops_run_in_seq_order_and_resubmits_are_idempotent(queue):
    sched, backend, futures, loop = queue
    sched.add_model("m", "s")
    ids = {seq: _submit(sched, futures, "m", seq, kind) for seq, kind in ((3, "fwdbwd"), (2, "optim"), (1, "fwdbwd"))}
    assert _submit(sched, futures, "m", 2, "optim") == ids[2], "a retried submit gets the first request id"
    with pytest.raises(UserError, match="another body"):
        _submit(sched, futures, "m", 2, "optim", digest="changed")
    with pytest.raises(UserError, match="invalid: fix it"):
        sched.submit_seq("m", 4, "bad", error="invalid: fix it")
    with pytest.raises(UserError, match="invalid: fix it"):  # the same answer for its resubmit
        sched.submit_seq("m", 4, "bad", error="invalid: fix it")
    _submit(sched, futures, "m", 5, "optim")
    _drain(sched, futures, loop, 4)
    order = [p for kind, ps in backend.calls for p in (ps if kind == "batch" else [ps])]
    assert order == ["m:1", "m:2", "m:3", "m:5"], "seq order, and seq 4 (refused at submit) skipped"
    assert futures.stats["created"] == 4


def test_a_gap_stalls_only_its_own_model(queue):
    sched, backend, futures, loop = queue
    sched.add_model("gap", "s")
    sched.add_model("ok", "s")
    _submit(sched, futures, "gap", 2)  # seq 1 never comes (a client-side custom loss raised)
    _submit(sched, futures, "ok", 1)
    _drain(sched, futures, loop, 1)
    assert backend.calls == [("batch", ["ok:1"])]
    assert sched.queued() == 1


def test_a_flood_cannot_starve_another_client(queue):
    """Model "flood" queues 30 requests, then "quiet" one: with room for 2 per batch, quiet's
    request runs in the first batch that has room after it arrived, and the two alternate."""
    sched, backend, futures, loop = queue
    for m in ("flood", "quiet"):
        sched.add_model(m, "s")
    for seq in range(1, 31):
        _submit(sched, futures, "flood", seq)
    _submit(sched, futures, "quiet", 1)
    _submit(sched, futures, "quiet", 2)
    _drain(sched, futures, loop, 32)
    batches = [ps for kind, ps in backend.calls if kind == "batch"]
    assert all(sum(10 for _ in b) <= 20 for b in batches), "token cap"
    assert "quiet:1" in batches[0] and "quiet:2" in batches[1], batches[:3]
    assert [p for b in batches for p in b if p.startswith("flood")] == [f"flood:{s}" for s in range(1, 31)]


def test_one_batch_serves_every_model_with_work(queue):
    sched, backend, futures, loop = queue
    for m in "abc":
        sched.add_model(m, "s")
        _submit(sched, futures, m, 1, tokens=5)
    _drain(sched, futures, loop, 3)
    assert backend.calls == [("batch", ["a:1", "b:1", "c:1"])]
    assert sched.stats["max_models_per_batch"] == 3


def test_sampling_batches_are_fair_and_capped(queue):
    sched, backend, futures, loop = queue
    for k in range(10):  # session "flood" asks for 10 x 4 rows, "quiet" for 4
        sched.submit_sample("flood", 4, lambda k=k: Task("sample", f"flood:{k}", futures.new("flood", "sample"), 4))
    sched.submit_sample("quiet", 4, lambda: Task("sample", "quiet:0", futures.new("quiet", "sample"), 4))
    _drain(sched, futures, loop, 11)
    batches = [ps for kind, ps in backend.calls if kind == "samples"]
    assert batches[0] == ["flood:0", "quiet:0"] and all(len(b) <= 2 for b in batches)


def test_a_full_sampling_queue_asks_for_backoff():
    loop = asyncio.new_event_loop()
    futures = FutureTable(loop)
    sched = Scheduler(RecordingBackend(), futures, max_batch_tokens=20, max_sample_rows=8, max_queued_sample_rows=8)
    sched.submit_sample("s", 8, lambda: Task("sample", "a", futures.new("s", "sample"), 8))
    with pytest.raises(OverflowError, match="retry"):
        sched.submit_sample("s", 1, lambda: Task("sample", "b", futures.new("s", "sample"), 1))
    assert futures.stats["created"] == 1, "a refused request leaves no future behind"
    loop.close()


def test_ending_a_session_fails_its_queued_work_and_keeps_the_rest(queue):
    sched, backend, futures, loop = queue
    sched.add_model("mine", "s1")
    sched.add_model("theirs", "s2")
    _submit(sched, futures, "mine", 1)
    _submit(sched, futures, "theirs", 1)
    assert sched.end_session("s1") == ["mine"]
    _drain(sched, futures, loop, 2)
    assert futures.stats["failed"] == 1 and futures.stats["succeeded"] == 1
    with pytest.raises(UserError, match="unknown model_id"):
        _submit(sched, futures, "mine", 2)
