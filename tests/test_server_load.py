"""A bounded loopback load test: 8 SDK training clients x 50 pipelined calls (forward_backward
with two losses, forward, optim_step, sample) against one server. Every future resolves exactly
once (through 408 "try again" re-polls too), nothing stays pending, and the throughput is printed
(run with -s to see it)."""
import threading
import time

import pytest

tinker = pytest.importorskip("tinker")
pytest.importorskip("fastapi")
from tinker import types  # noqa: E402

from test_server import ce_datum, rl_datum, running, sdk  # noqa: E402

CLIENTS, CALLS = 8, 50


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_server import save_test_model
    return save_test_model(tmp_path_factory.mktemp("model"))


def test_eight_clients_fifty_calls_every_future_once(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    # A 0.5 s long-poll hold: pipelined futures wait longer, so the SDK's 408 re-polls happen under load.
    with running(model_dir, tmp_path, poll_hold_s=0.5) as server, sdk(server) as sc:
        clients = [sc.create_lora_training_client(base_model=model_dir, rank=2 ** (i % 6), seed=i).result()
                   for i in range(CLIENTS)]
        tok = clients[0].get_tokenizer()
        seq, ce = ce_datum(tok)
        rl = rl_datum(seq, [-3.0] * (len(seq) - 1), [0.1] * (len(seq) - 1))
        sampler = sc.create_sampling_client(base_model=model_dir).result()
        prompt = types.ModelInput.from_ints(seq[:6])
        results, errors = [[] for _ in range(CLIENTS)], []

        def work(k):
            tc, futures = clients[k], []
            for i in range(CALLS):
                op = i % 5
                if op == 0:
                    futures.append(tc.forward_backward([ce, ce], "cross_entropy"))
                elif op == 1:
                    futures.append(tc.forward_backward([rl], "importance_sampling"))
                elif op == 2:
                    futures.append(tc.optim_step(types.AdamParams(learning_rate=1e-3)))
                elif op == 3:
                    futures.append(tc.forward([ce], "cross_entropy"))
                else:
                    futures.append(sampler.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=i)))
            try:
                results[k] = [f.result() for f in futures]
            except Exception as e:
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=work, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        assert not errors, errors[:3]
        assert [len(r) for r in results] == [CALLS] * CLIENTS
        stats = server.server.stats()
        fut, queue = stats["futures"], stats["queue"]
        assert fut["created"] == fut["resolved"] == fut["succeeded"] and fut.get("resolved_twice", 0) == 0
        assert stats["pending_futures"] == 0
        assert queue["fwdbwd_requests"] == CLIENTS * CALLS * 3 // 5
        assert queue["fwdbwd_batches"] < queue["fwdbwd_requests"], "concurrent clients share base forwards"
        print(f"\nload: {CLIENTS} clients x {CALLS} calls = {CLIENTS * CALLS} calls in {wall:.1f} s "
              f"({CLIENTS * CALLS / wall:.1f} calls/s); {queue['fwdbwd_requests']} forward(_backward)s in "
              f"{queue['fwdbwd_batches']} base passes (up to {queue['max_models_per_batch']} models each), "
              f"{queue['sample_requests']} samples in {queue['sample_batches']} decoding batches; "
              f"{fut.get('try_again', 0)} polls answered 408 (try again)")
