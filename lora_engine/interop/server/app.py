"""The HTTP side of ``lora-engine serve``: the REST API of the Tinker SDK (``tinker`` 0.38) on
FastAPI, in front of one base model (``backend.Backend``) and its queue (``scheduler.Scheduler``).

Submit endpoints answer at once with ``{"request_id"}``; the SDK then long-polls
``retrieve_future``, held here up to ``poll_hold_s`` and answered 408 while pending (the SDK
re-polls at once, quietly). A failed request is a 200 ``{"error", "category"}`` (the SDK raises
``RequestFailedError``); a request refused at submit is a 4xx with ``{"detail": message}``.
forward_backward bodies and the results of forward_backward and sample are protobuf; all else
is JSON. Every request needs ``X-API-Key``; POST bodies need a Content-Length within the caps.
Ids are unguessable (128-bit): a session id is what a client proves itself with, and a model id,
sampler id or request id contains or is one. A request that names two things (a model and a
checkpoint path, a session and a path) is refused with 403 when they belong to different owners.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass

from fastapi import HTTPException

from lora_engine.interop.server import schemas as S
from lora_engine.interop.server import wire
from lora_engine.interop.server.backend import Backend, SamplerInfo
from lora_engine.interop.server.sampler import Request as SampleRequest
from lora_engine.interop.server.scheduler import FutureTable, Scheduler, Task, UserError
from lora_engine.interop.server.store import Store, StoreError, check_name

log = logging.getLogger("lora_engine.serve")
API = "/api/v1"
JSON_LIMIT = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """``lora-engine serve``'s settings (the CLI flags map onto these one to one)."""

    model: str = "tiny"
    api_key: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    store: str = "lora-engine-store"
    max_batch_tokens: int = 16384   # tokens per forward/backward batch (the first request always fits)
    max_sample_rows: int = 256      # sequences decoded together
    max_request_mb: float = 16.0    # forward_backward body cap (advertised to the SDK, which chunks below it)
    max_datums: int = 256           # datums per forward_backward request (ditto)
    poll_hold_s: float = 25.0       # long-poll hold; the SDK's own timeout for a poll is 45 s
    session_timeout_s: float = 600.0  # no heartbeat this long (the SDK sends one every 10 s): session ends
    dtype: str = "float32"
    device: str = "auto"


def check_api_key(key: str) -> str:
    if not key:
        raise ValueError("no API key: pass --api-key tml-... or set LORA_ENGINE_API_KEY (clients send it as "
                         "TINKER_API_KEY)")
    if not key.startswith("tml-") or len(key) < 12:
        raise ValueError("the API key must start with 'tml-' (the SDK refuses others) and be at least 12 "
                         "characters, e.g. tml-$(openssl rand -hex 16)")
    return key


def _digest(obj) -> str:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()


class Server:
    """The state behind the routes. Built before the web server starts (loading the model is the
    slow part); the queue starts with the event loop (``start``)."""

    def __init__(self, cfg: ServeConfig):
        self.cfg, self.key = cfg, check_api_key(cfg.api_key).encode()
        self.store = Store(cfg.store, cfg.model)
        self.store.end_sessions_from_before(time.time())
        self.backend = Backend(cfg.model, self.store, dtype=cfg.dtype, device=cfg.device)
        self.sessions: dict[str, dict] = {}
        self.models: dict[str, dict] = {}
        self._samples_seen: dict[tuple[str, int], dict] = {}
        self.futures: FutureTable | None = None
        self.scheduler: Scheduler | None = None

    def start(self) -> None:
        self.futures = FutureTable(asyncio.get_running_loop())
        self.scheduler = Scheduler(self.backend, self.futures, max_batch_tokens=self.cfg.max_batch_tokens,
                                   max_sample_rows=self.cfg.max_sample_rows)
        self.scheduler.start()

    # -- lookups (4xx as HTTPException) ------------------------------------------------------------
    def session(self, session_id: str) -> dict:
        s = self.sessions.get(session_id)
        if s is None or s.get("ended"):
            raise HTTPException(410, f"session {session_id!r} has ended (or is from before a server restart): "
                                     "create a new ServiceClient")
        s["last_seen"] = time.monotonic()
        return s

    def model(self, model_id: str) -> dict:
        m = self.models.get(model_id)
        if m is None:
            raise HTTPException(404, f"unknown model_id {model_id!r}: create it with create_lora_training_client "
                                     "(models do not survive a server restart; their saved checkpoints do)")
        self.session(m["session_id"])
        return m

    def base_name(self, name: str | None) -> str:
        served = sorted(self.backend.served_names())
        if name not in served:
            raise HTTPException(400, f"base_model {name!r} is not served here; served: {served} (lora-engine serve "
                                     "--model NAME|PATH serves one base model)")
        return self.backend.model_name

    def readable(self, path: str, owner: str) -> tuple[dict, object]:
        rec, directory = self.store.readable(path, owner)
        if rec.get("base_model") not in self.backend.served_names():
            raise StoreError(400, f"{path} was trained on {rec.get('base_model')!r}, not on the base served here")
        return rec, directory

    # -- submitting --------------------------------------------------------------------------------
    def sequenced(self, model_id: str, seq_id, digest: str, kind: str, build) -> dict:
        """Queue op ``seq_id`` of a model; ``build(model) -> (payload, tokens)`` validates it. An
        invalid request still uses up its seq_id, so the model's later requests run."""
        m = self.model(model_id)
        try:
            payload, tokens = build(m)
        except (wire.WireError, StoreError, UserError) as e:
            with contextlib.suppress(UserError):
                self.scheduler.submit_seq(model_id, seq_id, digest, error=str(e))
            raise HTTPException(getattr(e, "status", 400), str(e)) from None
        try:
            rid = self.scheduler.submit_seq(model_id, seq_id, digest, lambda: Task(
                kind, payload, self.futures.new(m["session_id"], kind), tokens))
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return {"request_id": rid, "model_id": model_id}

    def control(self, session_id: str, kind: str, *payload) -> str:
        fut = self.futures.new(session_id, kind)
        self.scheduler.submit_control(Task("control", (kind, *payload), fut))
        return fut.request_id

    def end_session(self, session_id: str, reason: str) -> None:
        s = self.sessions.get(session_id)
        if s is None or s.get("ended"):
            return
        s["ended"] = {"at": time.time(), "reason": reason}
        self.store.save_session({k: v for k, v in s.items() if k != "last_seen"})
        self.scheduler.end_session(session_id)
        for mid in [mid for mid, m in self.models.items() if m["session_id"] == session_id]:
            del self.models[mid]
        for key in [k for k in self._samples_seen if k[0].startswith(session_id + ":")]:
            del self._samples_seen[key]

    def sweep(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if not s.get("ended") and now - s["last_seen"] > self.cfg.session_timeout_s:
                self.end_session(sid, "no heartbeat")
        self.futures.sweep(keep_retrieved_s=600.0,
                           ended_sessions={sid for sid, s in self.sessions.items() if s.get("ended")})

    def stats(self) -> dict:
        return {"futures": dict(self.futures.stats), "pending_futures": self.futures.pending,
                "queue": dict(self.scheduler.stats), "base_forwards_in_fwdbwd": self.backend.base_forwards,
                "live_sessions": sum(not s.get("ended") for s in self.sessions.values()),
                "models": len(self.models)}


def new_session_id() -> str:
    return f"s{secrets.token_hex(16)}"


def sample_request(server: Server, body: S.Asample, info: SamplerInfo) -> tuple[dict, int]:
    """Validate a sample request into the backend's job; the second value is its row count."""
    unsupported = [name for name, on in (("topk_sample_logprobs", body.topk_sample_logprobs),
                                         ("prompt_alt_tokens_k", body.prompt_alt_tokens_k),
                                         ("target_prompt_logprobs", body.target_prompt_logprobs)) if on]
    if unsupported:
        raise UserError(f"{unsupported} are not supported by this server: drop them")
    prompt = wire.prompt_tokens(body.prompt, server.backend.vocab_size)
    room = server.backend.max_len - len(prompt)
    if not prompt or room < 1:
        raise UserError(f"prompt has {len(prompt)} tokens; this model takes 1..{server.backend.max_len - 1} "
                        "with room for one generated token")
    last_n = body.prompt_logprobs_last_n
    if last_n is not None and not (body.prompt_logprobs and 1 <= last_n <= len(prompt) - 1):
        raise UserError("prompt_logprobs_last_n needs prompt_logprobs=True and 1 <= n <= len(prompt) - 1")
    sp = body.sampling_params
    eos = {server.backend.client.eos_id}
    stop = sp.stop
    stop_ids = eos if stop is None else (set() if stop == [] else
                                         (set(stop) if all(isinstance(s, int) for s in stop) else eos))
    if any(not 0 <= t < server.backend.vocab_size for t in stop_ids):
        raise UserError(f"stop token ids must be in [0, {server.backend.vocab_size})")
    stop_strs = (stop,) if isinstance(stop, str) else tuple(s for s in (stop or []) if isinstance(s, str))
    seed = sp.seed if sp.seed is not None else secrets.randbits(63)
    req = SampleRequest(adapter_id=-1, prompt=prompt, n=body.num_samples,
                        max_tokens=min(sp.max_tokens or 128, room), temperature=sp.temperature, top_k=sp.top_k,
                        top_p=sp.top_p, stop_ids=frozenset(stop_ids), stop_strs=stop_strs, seed=seed)
    job = {"sampler_id": info.sampler_id, "request": req, "prompt_logprobs": bool(body.prompt_logprobs),
           "topk": body.topk_prompt_logprobs, "last_n": last_n}
    return job, body.num_samples


def save_payload(m: dict, body, name: str | None) -> dict:
    return {"model_id": m["model_id"], "session_id": m["session_id"], "owner": m["owner"], "seq_id": body.seq_id,
            "name": check_name(name) if name else None, "overwrite": getattr(body, "overwrite", True)}
