"""A server killed with SIGKILL and restarted on the same store serves the saved adapters again:
sampler weights sample the same tokens, a training state resumes with the same loss; the old
session is told it has ended (410), and another owner still gets 403. Slow: two server starts
in subprocesses, ~20-25 s on the 2-core CPU."""
import os
import subprocess
import sys
import time

import pytest

tinker = pytest.importorskip("tinker")
pytest.importorskip("fastapi")
import httpx  # noqa: E402
from tinker import types  # noqa: E402

from test_server import KEY, ce_datum, free_port, loss_of, save_test_model  # noqa: E402


def start(model_dir, store, port):
    env = {**os.environ, "LORA_ENGINE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "lora_engine.cli", "serve", "--model", model_dir, "--port",
                             str(port), "--store", str(store), "--device", "cpu"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v1/healthz", headers={"X-API-Key": KEY}).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


@pytest.mark.slow
def test_restart_on_the_same_store_serves_saved_adapters(tmp_path, monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    model_dir, store, port = save_test_model(tmp_path / "model"), tmp_path / "store", free_port()
    url = f"http://127.0.0.1:{port}"
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    proc = start(model_dir, store, port)
    try:
        sc = tinker.ServiceClient(base_url=url, api_key=KEY, project_id="restart")
        tc = sc.create_lora_training_client(base_model=model_dir, rank=4, seed=1).result()
        seq, ce = ce_datum(tc.get_tokenizer())
        tc.forward_backward([ce], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        state = tc.save_state("after-step-1").result().path
        weights = tc.save_weights_for_sampler("after-step-1").result().path
        loss = loss_of(tc, ce)
        prompt = types.ModelInput.from_ints(seq[:6])
        tokens = [s.tokens for s in sc.create_sampling_client(model_path=weights).result()
                  .sample(prompt, 2, params).result().sequences]
        old_session = tc.model_id.split(":")[0]
    finally:
        proc.kill()  # SIGKILL: no shutdown hook runs
        proc.wait(30)
    proc = start(model_dir, store, port)
    try:
        r = httpx.post(f"{url}/api/v1/session_heartbeat", json={"session_id": old_session}, headers={"X-API-Key": KEY})
        assert r.status_code == 410
        with tinker.ServiceClient(base_url=url, api_key=KEY, project_id="restart") as sc2:
            again = sc2.create_sampling_client(model_path=weights).result().sample(prompt, 2, params).result()
            assert [s.tokens for s in again.sequences] == tokens
            resumed = sc2.create_training_client_from_state_with_optimizer(state).result()
            assert loss_of(resumed, ce) == pytest.approx(loss, rel=1e-6)
            resumed.forward_backward([ce], "cross_entropy").result()
            assert resumed.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics["step:max"] == 2.0
        with tinker.ServiceClient(base_url=url, api_key=KEY) as stranger:
            with pytest.raises(tinker.PermissionDeniedError):
                stranger.create_sampling_client(model_path=weights).result()
    finally:
        proc.kill()
        proc.wait(30)
