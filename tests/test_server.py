"""`lora-engine serve` with the real Tinker SDK as the only client: the public flow end to end,
many clients in one base forward, auth (401), isolation (403), bad payloads (4xx; the server and
other clients' queued work survive), the CLI's errors. The server runs in this process on a free
loopback port (``BackgroundServer``) on a 1-layer random Qwen3 with the tiny character tokenizer.
"""
import contextlib
import math
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers

tinker = pytest.importorskip("tinker")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402  (a dependency of tinker)
from tinker import types  # noqa: E402

from lora_engine.interop.server.app import ServeConfig  # noqa: E402
from lora_engine.interop.server.http import BackgroundServer  # noqa: E402

KEY = "tml-test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_test_model(path) -> str:
    from lora_engine.rl.tiny_model import build_tokenizer
    tok = build_tokenizer()
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@contextlib.contextmanager
def running(model: str, store, **overrides):
    cfg = ServeConfig(model=model, api_key=KEY, port=free_port(), store=str(store), device="cpu", **overrides)
    with BackgroundServer(cfg) as server:
        server.model = model
        yield server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_test_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    # 2 datums per request: a 5-datum forward_backward arrives as 3 chunks, later ones first.
    with running(model_dir, tmp_path_factory.mktemp("store"), max_datums=2, max_request_mb=1.0) as server:
        yield server


@pytest.fixture(autouse=True)
def _quiet_sdk(monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")


def sdk(server, **kw):
    return tinker.ServiceClient(base_url=server.url, api_key=KEY, **kw)


def ce_datum(tok, text="12+34=\\boxed{46}", prompt_len=6):
    seq = tok.encode(text, add_special_tokens=False)
    w = [0.0] * (prompt_len - 1) + [1.0] * (len(seq) - prompt_len)
    return seq, types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                            loss_fn_inputs={"target_tokens": seq[1:], "weights": w})


def rl_datum(seq, q, adv):
    return types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                       loss_fn_inputs={"target_tokens": seq[1:], "logprobs": q, "advantages": adv})


def loss_of(tc, datum) -> float:
    return tc.forward([datum], "cross_entropy").result().metrics["loss:sum"]


def test_sdk_flow_end_to_end(served, model_dir):
    with sdk(served) as sc:
        with pytest.raises(tinker.BadRequestError, match="not served here"):
            sc.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=4).result()
        tc = sc.create_lora_training_client(base_model=served.model, rank=4, seed=0).result()
        info = tc.get_info()
        assert info.lora_rank == 4 and info.model_data.tokenizer_id == model_dir
        tok = tc.get_tokenizer()
        seq, ce = ce_datum(tok)

        fwd = tc.forward([ce], "cross_entropy").result()
        lp = fwd.loss_fn_outputs[0]["logprobs"].to_numpy()
        w = np.array(ce.loss_fn_inputs["weights"].data)
        assert lp.shape == (len(seq) - 1,) and np.all(lp < 0), "log-probs on every input token"
        assert fwd.metrics["loss:sum"] == pytest.approx(-(lp * w).sum(), rel=1e-5)
        fb, op = tc.forward_backward([ce], "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=1e-2))
        assert fb.result().metrics["loss:sum"] == pytest.approx(fwd.metrics["loss:sum"], rel=1e-5)
        assert op.result().metrics["step:max"] == 1.0
        assert loss_of(tc, ce) < fwd.metrics["loss:sum"], "one step on the cross-entropy lowers it"

        q = (lp - 0.3).astype(np.float32).tolist()
        adv = np.linspace(-1, 1, len(lp)).astype(np.float32).tolist()
        for loss, cfg in [("importance_sampling", None),
                          ("ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
                          ("cispo", {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}), ("dro", {"beta": 0.05})]:
            assert math.isfinite(tc.forward_backward([rl_datum(seq, q, adv)], loss, cfg).result().metrics["loss:sum"])
        with pytest.raises(tinker.BadRequestError, match="needs loss_config"):
            tc.forward_backward([rl_datum(seq, q, adv)], "dro").result()

    with sdk(served) as sc:  # the refused request above poisoned that TrainingClient (SDK behaviour)
        tc = sc.create_lora_training_client(base_model=served.model, rank=4, seed=0).result()
        many = tc.forward_backward([ce] * 5, "cross_entropy").result()  # 3 chunks, sent out of order
        assert len(many.loss_fn_outputs) == 5
        assert many.metrics["loss:sum"] == pytest.approx(5 * loss_of(tc, ce), rel=1e-5)

        def custom(data, logprobs_list):
            loss = sum((x ** 2).sum() for x in logprobs_list)
            return loss, {"sq:sum": float(loss.detach())}
        out = tc.forward_backward_custom([ce], custom).result()
        lp = tc.forward([ce], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        assert out.metrics["loss:sum"] == pytest.approx(float((lp ** 2).sum()), rel=1e-5)
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()

        sw = tc.save_weights_for_sampler("s1").result()
        st = tc.save_state("st1").result()
        assert sw.path == f"tinker://{tc.model_id}/sampler_weights/s1" and st.path.endswith("/weights/st1")
        with pytest.raises(tinker.RequestFailedError, match="already exists"):
            tc.save_state("st1").result()
        at_save_out = tc.forward([ce], "cross_entropy").result()
        at_save, lp = at_save_out.metrics["loss:sum"], at_save_out.loss_fn_outputs[0]["logprobs"].to_numpy()

        samp = sc.create_sampling_client(model_path=sw.path).result()
        prompt = types.ModelInput.from_ints(seq[:6])
        params = types.SamplingParams(max_tokens=5, temperature=1.0, seed=7)
        res = samp.sample(prompt, 3, params, include_prompt_logprobs=True, topk_prompt_logprobs=2).result()
        assert len(res.sequences) == 3 and res.prompt_logprobs[0] is None and len(res.topk_prompt_logprobs[1]) == 2
        again = samp.sample(prompt, 3, params).result()
        assert [s.tokens for s in again.sequences] == [s.tokens for s in res.sequences], "same seed, same samples"
        # The sampler and the trainer agree: prompt log-probs, and each sample's log-probs, are
        # what a forward of the same tokens computes.
        full = samp.compute_logprobs(types.ModelInput.from_ints(seq)).result()
        np.testing.assert_allclose(full[1:], lp, rtol=1e-4, atol=1e-5)
        s0 = res.sequences[0]
        toks = seq[:6] + list(s0.tokens)
        fwd = tc.forward([types.Datum(model_input=types.ModelInput.from_ints(toks[:-1]),
                                      loss_fn_inputs={"target_tokens": toks[1:]})], "cross_entropy").result()
        np.testing.assert_allclose(fwd.loss_fn_outputs[0]["logprobs"].to_numpy()[5:], s0.logprobs, rtol=1e-4, atol=1e-5)

        live = tc.save_weights_and_get_sampling_client().result()
        assert len(live.sample(prompt, 2, types.SamplingParams(max_tokens=3)).result().sequences) == 2
        base = sc.create_sampling_client(base_model=served.model).result()
        assert base.sample(prompt, 1, types.SamplingParams(max_tokens=3, temperature=0.0)).result().sequences

        tc.forward_backward([ce], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=0.5)).result()
        assert abs(loss_of(tc, ce) - at_save) > 1e-3
        tc.load_state(st.path).result()
        assert loss_of(tc, ce) == pytest.approx(at_save, rel=1e-6)
        tc2 = sc.create_training_client_from_state_with_optimizer(st.path).result()
        assert tc2.get_info().lora_rank == 4 and loss_of(tc2, ce) == pytest.approx(at_save, rel=1e-6)


def _stats(server):
    return httpx.get(f"{server.url}/api/v1/server_stats", headers={"X-API-Key": KEY}).json()


def _wait_queued(server, n, timeout=20.0):
    deadline = time.time() + timeout
    while server.server.scheduler.queued() < n:
        assert time.time() < deadline, f"only {server.server.scheduler.queued()} of {n} requests arrived"
        time.sleep(0.02)


def test_clients_of_different_ranks_and_losses_share_one_base_forward_and_decoding_batch(served):
    with sdk(served) as sc:
        clients = [sc.create_lora_training_client(base_model=served.model, rank=r, seed=i).result()
                   for i, r in enumerate((1, 8, 32))]
        tok = clients[0].get_tokenizer()
        seq, ce = ce_datum(tok)
        rl = rl_datum(seq, [-2.0] * (len(seq) - 1), [0.5] * (len(seq) - 1))
        jobs = [(ce, "cross_entropy", None), (rl, "ppo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
                (rl, "cispo", None)]
        before = _stats(served)
        served.server.scheduler.pause()
        try:
            futures = [tc.forward_backward([d], loss, cfg) for tc, (d, loss, cfg) in zip(clients, jobs)]
            _wait_queued(served, 3)
        finally:
            served.server.scheduler.resume()
        assert all(math.isfinite(f.result().metrics["loss:sum"]) for f in futures)
        after = _stats(served)
        assert after["queue"]["fwdbwd_batches"] - before["queue"].get("fwdbwd_batches", 0) == 1
        assert after["base_forwards_in_fwdbwd"] - before.get("base_forwards_in_fwdbwd", 0) == 1
        assert after["queue"]["max_models_per_batch"] >= 3

        # Sampling from three adapters: one decoding batch.
        samplers = [tc.save_weights_and_get_sampling_client().result() for tc in clients]
        prompt = types.ModelInput.from_ints(seq[:6])
        before = _stats(served)["queue"].get("sample_batches", 0)
        served.server.scheduler.pause()
        try:
            samples = [s.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=k)) for k, s in enumerate(samplers)]
            _wait_queued(served, 3)
        finally:
            served.server.scheduler.resume()
        assert all(len(f.result().sequences) == 2 for f in samples)
        assert _stats(served)["queue"]["sample_batches"] == before + 1

        others = [loss_of(tc, ce) for tc in clients[1:]]
        mine = loss_of(clients[0], ce)
        clients[0].optim_step(types.AdamParams(learning_rate=1e-2)).result()
        assert loss_of(clients[0], ce) != mine, "optim_step moved its own adapter"
        assert [loss_of(tc, ce) for tc in clients[1:]] == others, "and nobody else's"


def test_sampling_params_are_per_request_in_one_decoding_batch(served):
    with sdk(served) as sc:
        tc = sc.create_lora_training_client(base_model=served.model, rank=2).result()
        tok = tc.get_tokenizer()
        sampler = tc.save_weights_and_get_sampling_client().result()
        prompt = types.ModelInput.from_ints(tok.encode("12+34=", add_special_tokens=False))
        asks = {"greedy": (1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])),
                "top_k=1": (2, types.SamplingParams(max_tokens=6, temperature=1.5, top_k=1, stop=[])),
                "no_stop": (3, types.SamplingParams(max_tokens=5, temperature=1.0, stop=[], seed=1)),
                "stop_str": (2, types.SamplingParams(max_tokens=6, temperature=1.0, stop=["1"], seed=2))}
        before = _stats(served)["queue"].get("sample_batches", 0)
        served.server.scheduler.pause()
        try:
            futures = {k: sampler.sample(prompt, n, p) for k, (n, p) in asks.items()}
            _wait_queued(served, len(asks))
        finally:
            served.server.scheduler.resume()
        out = {k: f.result().sequences for k, f in futures.items()}
        assert _stats(served)["queue"]["sample_batches"] == before + 1, "four requests, one decoding batch"
        greedy = out["greedy"][0].tokens
        assert len(greedy) == 6 and all(s.tokens == greedy for s in out["top_k=1"]), "top_k=1 is greedy"
        assert all(len(s.tokens) == 5 and s.stop_reason == "length" for s in out["no_stop"])
        for s in out["stop_str"]:
            text = tok.decode(s.tokens)
            assert s.stop_reason == "length" or ("1" in text and "1" not in tok.decode(s.tokens[:-1])), text


def test_auth_needs_the_servers_key(served):
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(base_url=served.url, api_key="tml-wrong-key-000000").create_lora_training_client(
            base_model=served.model, rank=2).result()
    assert httpx.get(f"{served.url}/api/v1/healthz").status_code == 401
    wrong = httpx.post(f"{served.url}/api/v1/create_session", json={}, headers={"X-API-Key": "tml-nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{served.url}/api/v1/healthz", headers={"X-API-Key": KEY}).json() == {"status": "ok"}


def test_sessions_cannot_touch_each_others_checkpoints(served):
    with sdk(served) as a, sdk(served) as b:
        ta = a.create_lora_training_client(base_model=served.model, rank=2).result()
        state, weights = ta.save_state("mine").result().path, ta.save_weights_for_sampler("mine").result().path
        tb = b.create_lora_training_client(base_model=served.model, rank=2).result()
        with pytest.raises(tinker.PermissionDeniedError, match="another session"):
            b.create_sampling_client(model_path=weights).result()
        with pytest.raises(tinker.PermissionDeniedError):
            tb.load_state(state).result()
        with pytest.raises(tinker.PermissionDeniedError):
            b.create_training_client_from_state(state).result()
        assert a.create_sampling_client(model_path=weights).result().sample(
            types.ModelInput.from_ints([5, 6]), 1, types.SamplingParams(max_tokens=2)).result().sequences
    with sdk(served, project_id="team") as c, sdk(served, project_id="team") as d:  # a project shares
        tc = c.create_lora_training_client(base_model=served.model, rank=2).result()
        path = tc.save_state("shared").result().path
        assert d.create_training_client_from_state(path).result().get_info().lora_rank == 2


def _fwdbwd_body(model_id, seq_id, loss="cross_entropy", tokens=(5, 6, 7), targets=(6, 7, 8), extra=None):
    from tinker.proto import tinker_public_pb2 as pb
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss)
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray(tokens, "<i4").tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dtype, t.dense = pb.DTYPE_INT64, np.asarray(targets, "<i8").tobytes()
    t.shape.append(len(targets))
    for name, values in (extra or {}).items():
        e = d.loss_fn_inputs[name]
        e.dtype, e.dense = pb.DTYPE_FLOAT32, np.asarray(values, "<f4").tobytes()
        e.shape.append(len(values))
    return msg.SerializeToString()


def test_bad_payloads_get_4xx_and_spare_other_clients_work(served):
    url, h = f"{served.url}/api/v1", {"X-API-Key": KEY}
    proto = {**h, "Content-Type": "application/x-protobuf"}
    with sdk(served) as sc:
        good = sc.create_lora_training_client(base_model=served.model, rank=2).result()
        # raw requests below use this model's id and seq_ids
        target = sc.create_lora_training_client(base_model=served.model, rank=2).result().model_id
        _, ce = ce_datum(good.get_tokenizer())
        served.server.scheduler.pause()
        try:
            queued = good.forward_backward([ce], "cross_entropy")  # queued work that must survive
            _wait_queued(served, 1)
            cases = [
                (b"\xff\x00 not a protobuf", proto, 400, "not a tinker_public"),
                (b"{}", {**h, "Content-Type": "application/json"}, 415, "protobuf"),
                (b"x" * (2 << 20), proto, 413, "cap"),
                (_fwdbwd_body(target, 1, loss="reinforce"), proto, 400, "not served"),
                (_fwdbwd_body(target, 2, targets=(6, 7, 10**6)), proto, 400, "token ids"),
                (_fwdbwd_body(target, 3, targets=(6, 7)), proto, 400, "expected"),
                (_fwdbwd_body(target, 4, loss="importance_sampling",
                              extra={"logprobs": [0, 0, 0], "advantages": [1, float("nan"), 0]}), proto, 400, "NaN"),
                (_fwdbwd_body("nobody:train:0", 1), proto, 404, "unknown model_id"),
            ]
            for body, headers, status, needle in cases:
                r = httpx.post(f"{url}/forward_backward", content=body, headers=headers)
                assert r.status_code == status and needle in r.json()["detail"], (status, r.text)
            for path, body, status in [("create_model", b"{not json", 422), ("create_session", b"[1, 2]", 422),
                                       ("create_model", b'{"session_id": "x", "model_seq_id": 0, "base_model": "m", '
                                                        b'"lora_config": {"rank": "high"}}', 422),
                                       ("optim_step", b'{"model_id": "%s", "seq_id": 5, "adam_params": '
                                                      b'{"learning_rate": -1}}' % target.encode(), 422),
                                       ("retrieve_future", b'{"request_id": "req-nope"}', 404)]:
                r = httpx.post(f"{url}/{path}", content=body, headers={**h, "Content-Type": "application/json"})
                assert r.status_code == status and r.json()["detail"], (path, r.text)
            # the invalid requests used up seq 1..4 of `target`: its next valid request runs
            ok = httpx.post(f"{url}/forward_backward", content=_fwdbwd_body(target, 5), headers=proto)
            assert ok.status_code == 200, ok.text
        finally:
            served.server.scheduler.resume()
        assert math.isfinite(queued.result().metrics["loss:sum"])
        r = httpx.post(f"{url}/retrieve_future", json={"request_id": ok.json()["request_id"]},
                       headers={**h, "Accept": "application/x-protobuf"}, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    assert httpx.get(f"{url}/healthz", headers=h).status_code == 200
    assert _stats(served)["futures"].get("resolved_twice", 0) == 0


def test_cli_serve_errors_name_the_fix(tmp_path, monkeypatch):
    from lora_engine import cli
    monkeypatch.delenv("LORA_ENGINE_API_KEY", raising=False)
    assert cli.main(["serve", "--model", "tiny", "--store", str(tmp_path)]) == 2  # no key: refused before loading
    code = ("import sys; sys.modules['fastapi'] = None; from lora_engine import cli; "
            "sys.exit(cli.main(['serve', '--api-key', 'tml-0123456789ab']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pip install 'lora-engine[serve]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-c", "import lora_engine, lora_engine.interop.client, sys; "
                        "print('fastapi' in sys.modules, 'uvicorn' in sys.modules)"], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == "False False", "the core never imports the web stack"
