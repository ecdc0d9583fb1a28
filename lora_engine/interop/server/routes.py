"""The endpoints, in the order the SDK calls them: handshake, session, training, sampling,
futures. Each validates, then queues (``Server.sequenced`` / ``control`` / the sample queue)
or answers directly; state and helpers are in ``app``."""
from __future__ import annotations

import asyncio
import time

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

from lora_engine.engine import peft_format
from lora_engine.interop.server import schemas as S
from lora_engine.interop.server import wire
from lora_engine.interop.server.app import API, Server, _digest, new_session_id, sample_request, save_payload
from lora_engine.interop.server.backend import SamplerInfo, spec_for
from lora_engine.interop.server.scheduler import Task, UserError
from lora_engine.interop.server.store import StoreError


def _user(e: Exception) -> HTTPException:
    return HTTPException(getattr(e, "status", 400), str(e))


def add_routes(app, server: Server) -> None:  # noqa: C901 - one flat list of endpoints reads best
    backend, cfg = server.backend, server.cfg

    # -- handshake and housekeeping ------------------------------------------------------------------
    @app.post(f"{API}/client/config")
    async def client_config():
        chunk_bytes = int(cfg.max_request_mb * 2**20 * 0.8)  # the SDK estimates sizes; leave it headroom
        return {"pjwt_auth_enabled": False, "use_pyqwest_transport": False, "proto_compress_fwdbwd": False,
                "parallel_fwdbwd_chunks": True, "fwdbwd_max_chunk_len": cfg.max_datums,
                "fwdbwd_max_chunk_bytes_count": chunk_bytes, "sample_use_retrieve_futures": False,
                "custom_loss_server_side": False, "sample_join_sampling_session": False}

    @app.post(f"{API}/client/dynamic_config")
    async def dynamic_config():
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @app.get(f"{API}/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get(f"{API}/get_server_capabilities")
    async def capabilities():
        return {"supported_models": [{"model_name": backend.model_name, "max_context_length": backend.max_len,
                                      "trainable": True, "sampleable": True}]}

    @app.post(f"{API}/telemetry")
    async def telemetry():
        return {"status": "accepted"}  # the SDK validates exactly this; events are not kept

    @app.get(f"{API}/server_stats")
    async def server_stats():
        return server.stats()

    # -- sessions ------------------------------------------------------------------------------------
    @app.post(f"{API}/create_session")
    async def create_session(body: S.CreateSession):
        sid = new_session_id()
        owner = f"project:{body.project_id}" if body.project_id else f"session:{sid}"
        rec = {"session_id": sid, "owner": owner, "project_id": body.project_id, "created": time.time()}
        server.store.save_session(rec)
        server.sessions[sid] = {**rec, "last_seen": time.monotonic()}
        return {"type": "create_session", "session_id": sid}

    @app.post(f"{API}/session_heartbeat")
    async def heartbeat(body: S.SessionRef):
        server.session(body.session_id)  # 410 stops the SDK's heartbeat loop
        return {"type": "session_heartbeat"}

    @app.post(f"{API}/sessions/{{session_id}}/finish")
    async def finish(session_id: str):
        if session_id in server.sessions:
            server.end_session(session_id, "finished by the client")
        return {}

    @app.post(f"{API}/cancel_future")
    async def cancel_future():
        return {}  # sample_cancel_enabled is false: the SDK never cancels

    # -- training models -------------------------------------------------------------------------------
    @app.post(f"{API}/create_model")
    async def create_model(body: S.CreateModel):
        s = server.session(body.session_id)
        base = server.base_name(body.base_model)
        try:
            spec = spec_for(body.lora_config.model_dump())
        except ValueError as e:
            raise _user(e) from None
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        if model_id in server.models:  # a retried create: the same model
            return {"request_id": server.models[model_id]["create_request"], "model_id": model_id}
        rec = {"model_id": model_id, "session_id": body.session_id, "owner": s["owner"], "base_model": base,
               "lora_config": body.lora_config.model_dump(), "rank": spec.rank}
        server.scheduler.add_model(model_id, body.session_id)
        rec["create_request"] = server.control(body.session_id, "create_model", model_id, spec, rec)
        server.models[model_id] = rec
        return {"request_id": rec["create_request"], "model_id": model_id}

    @app.post(f"{API}/get_info")
    async def get_info(body: S.ModelRef):
        m = server.model(body.model_id)
        return {"type": "get_info", "model_id": m["model_id"], "is_lora": True, "lora_rank": m["rank"],
                "model_name": backend.model_name,
                "model_data": {"arch": backend.arch, "model_name": backend.model_name,
                               "tokenizer_id": backend.model_dir}}

    @app.post(f"{API}/forward_backward")
    async def forward_backward(request: Request):
        if wire.PROTO not in request.headers.get("content-type", ""):
            raise HTTPException(415, f"forward_backward bodies are protobuf ({wire.PROTO}); use tinker >= 0.25")
        try:
            raw = wire.decode_body(await request.body(), request.headers.get("content-encoding"),
                                   int(cfg.max_request_mb * 2**20))
            msg = wire.parse_forward_backward(raw)
        except wire.WireError as e:
            raise _user(e) from None

        def build(_m):
            fb = wire.to_fwdbwd(msg, vocab_size=backend.vocab_size, max_len=backend.max_len,
                                max_datums=cfg.max_datums, pad_id=backend.client.pad_id)
            if fb.tokens > cfg.max_batch_tokens:
                raise wire.WireError(413, f"{fb.tokens} tokens in one request; this server batches at most "
                                          f"{cfg.max_batch_tokens}: send fewer datums per call")
            return fb, fb.tokens
        return server.sequenced(msg.model_id, int(msg.seq_id), _digest(raw), "fwdbwd", build)

    @app.post(f"{API}/optim_step")
    async def optim_step(body: S.OptimStep):
        def build(m):
            if body.adam_params is None:
                raise UserError("only AdamParams are supported: optim_step(tinker.AdamParams(...))")
            return {"model_id": m["model_id"], "adam": body.adam_params.model_dump()}, 0
        return server.sequenced(body.model_id, body.seq_id, _digest(body.model_dump()), "optim", build)

    @app.post(f"{API}/save_weights")
    async def save_weights(body: S.SaveWeights):
        return server.sequenced(body.model_id, body.seq_id, _digest(body.model_dump()), "save_state",
                                lambda m: (save_payload(m, body, body.path), 0))

    @app.post(f"{API}/save_weights_for_sampler")
    async def save_weights_for_sampler(body: S.SaveForSampler):
        def build(m):
            p = save_payload(m, body, body.path)
            if not body.path:
                if body.sampling_session_seq_id is None:
                    raise UserError("save_weights_for_sampler needs a path (a name) or a sampling_session_seq_id")
                p["sampler_id"] = f"{m['session_id']}:sample:{body.sampling_session_seq_id}"
            return p, 0
        return server.sequenced(body.model_id, body.seq_id, _digest(body.model_dump()), "save_sampler", build)

    @app.post(f"{API}/load_weights")
    async def load_weights(body: S.LoadWeights):
        if body.model_id is not None:  # TrainingClient.load_state*: into an existing model, in order
            def build(m):
                _, directory = server.readable(body.path, m["owner"])
                if body.optimizer and not (directory / "optimizer.safetensors").exists():
                    raise UserError(f"{body.path} holds no optimizer state: load it with load_state (weights only)")
                return {"model_id": m["model_id"], "path": body.path, "directory": directory,
                        "optimizer": body.optimizer}, 0
            return server.sequenced(body.model_id, body.seq_id, _digest(body.model_dump()), "load", build)
        if body.session_id is None or body.model_seq_id is None:
            raise HTTPException(400, "load_weights needs model_id (load into a model) or session_id + model_seq_id")
        s = server.session(body.session_id)
        model_id = f"{body.session_id}:train:{body.model_seq_id}"
        if model_id in server.models:
            return {"request_id": server.models[model_id]["create_request"], "model_id": model_id}
        try:
            if body.base_model is not None:
                server.base_name(body.base_model)
            _, directory = server.readable(body.path, s["owner"])
            if body.optimizer and not (directory / "optimizer.safetensors").exists():
                raise UserError(f"{body.path} holds no optimizer state: use create_training_client_from_state")
            spec = peft_format.read_spec(directory)
        except (StoreError, ValueError) as e:
            raise _user(e) from None
        rec = {"model_id": model_id, "session_id": body.session_id, "owner": s["owner"],
               "base_model": backend.model_name, "rank": spec.rank if spec else None}
        server.scheduler.add_model(model_id, body.session_id)
        rec["create_request"] = server.control(body.session_id, "load_new_model", model_id, directory,
                                               body.optimizer, body.path, rec)
        server.models[model_id] = rec
        return {"request_id": rec["create_request"], "model_id": model_id}

    # -- sampling ----------------------------------------------------------------------------------------
    @app.post(f"{API}/create_sampling_session")
    async def create_sampling_session(body: S.CreateSampling):
        s = server.session(body.session_id)
        sid = f"{body.session_id}:sample:{body.sampling_session_seq_id}"
        if body.model_path:
            try:
                _, directory = server.readable(body.model_path, s["owner"])
            except StoreError as e:
                raise _user(e) from None
            info = SamplerInfo(sid, body.session_id, model_path=body.model_path, directory=directory)
        else:
            server.base_name(body.base_model)
            info = SamplerInfo(sid, body.session_id)
        backend.samplers.setdefault(sid, info)
        return {"type": "create_sampling_session", "sampling_session_id": sid}

    @app.get(f"{API}/samplers/{{sampler_id}}")
    async def get_sampler(sampler_id: str):
        info = backend.samplers.get(sampler_id)
        if info is None:
            raise HTTPException(404, f"unknown sampling session {sampler_id!r}")
        return {"sampler_id": sampler_id, "base_model": backend.model_name, "model_path": info.model_path}

    @app.post(f"{API}/asample")
    async def asample(body: S.Asample):
        if body.sampling_session_id is None or body.seq_id is None:
            raise HTTPException(400, "asample needs sampling_session_id and seq_id: create a sampling client "
                                     "(ServiceClient.create_sampling_client) first")
        info = backend.samplers.get(body.sampling_session_id)
        if info is None:
            raise HTTPException(404, f"unknown sampling session {body.sampling_session_id!r}")
        server.session(info.session_id)
        key = (body.sampling_session_id, body.seq_id)
        if key in server._samples_seen:  # a retried submit: the same request
            return server._samples_seen[key]
        try:
            job, rows = sample_request(server, body, info)
        except ValueError as e:
            raise _user(e) from None
        try:
            task = server.scheduler.submit_sample(info.session_id, rows, lambda: Task(
                "sample", job, server.futures.new(info.session_id, "sample"), rows))
        except OverflowError as e:  # the SDK backs off on 429 and resubmits
            return JSONResponse({"detail": str(e)}, status_code=429)
        answer = {"request_id": task.future.request_id,
                  "sample_sequence_ids": [f"{body.sampling_session_id}:{body.seq_id}:{i}" for i in range(rows)]}
        server._samples_seen[key] = answer
        return answer

    # -- futures -------------------------------------------------------------------------------------------
    @app.post(f"{API}/retrieve_future")
    async def retrieve_future(body: S.RetrieveFuture, request: Request):
        fut = server.futures.get(body.request_id)
        if fut is None:
            raise HTTPException(404, f"unknown request_id {body.request_id!r} (finished session, or server restarted)")
        try:
            await asyncio.wait_for(fut.event.wait(), timeout=cfg.poll_hold_s)
        except asyncio.TimeoutError:  # 408: the SDK polls again at once, without a warning
            server.futures.stats["try_again"] += 1
            return JSONResponse({"type": "try_again", "request_id": fut.request_id, "queue_state": "active"},
                                status_code=408)
        fut.retrieved_at = fut.retrieved_at or time.monotonic()
        kind, value, *rest = fut.result
        if kind == "error":
            return {"error": value, "category": rest[0]}
        if kind == "proto":
            if wire.PROTO not in request.headers.get("accept", ""):
                raise HTTPException(406, f"this result is served as {wire.PROTO} only")
            return Response(content=value, media_type=wire.PROTO)
        return value
