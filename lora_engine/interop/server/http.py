"""The HTTP layer of ``lora-engine serve``: the FastAPI app (auth, body caps, validation errors,
the routes), ``serve`` for the CLI and ``BackgroundServer`` for tests and notebooks."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lora_engine.interop.server.app import API, JSON_LIMIT, Server, ServeConfig
from lora_engine.interop.server.routes import add_routes

log = logging.getLogger("lora_engine.serve")


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        server.start()
        sweeper = asyncio.create_task(_sweep_forever(server))
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.to_thread(server.scheduler.stop)

    app = FastAPI(title="lora-engine serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def auth_and_limits(request: Request, call_next):
        given = request.headers.get("x-api-key", "").encode()
        if not hmac.compare_digest(given, server.key):
            return JSONResponse({"detail": "missing or wrong X-API-Key: set TINKER_API_KEY to the key the "
                                           "server was started with"}, status_code=401)
        if request.method == "POST":
            limit = int(server.cfg.max_request_mb * 2**20) if request.url.path == f"{API}/forward_backward" \
                else JSON_LIMIT
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "POST bodies need a Content-Length header"}, status_code=411)
            if int(length) > limit:
                return JSONResponse({"detail": f"request body of {length} bytes is over this endpoint's "
                                               f"{limit}-byte cap: send smaller requests"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        errors = "; ".join(f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request: {errors}"}, status_code=422)

    add_routes(app, server)
    return app


async def _sweep_forever(server: Server) -> None:
    while True:
        await asyncio.sleep(30)
        try:
            server.sweep()
        except Exception:  # never let housekeeping take the server down
            log.exception("sweep failed")


def serve(cfg: ServeConfig) -> None:
    """Load the model, then serve until interrupted (``lora-engine serve``)."""
    import uvicorn

    server = Server(cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: plain HTTP; anyone who can reach it and has the key can train and sample",
                    cfg.host)
    print(f"lora-engine serve: {cfg.model} on http://{cfg.host}:{cfg.port} (store {server.store.root}); "
          f"clients: TINKER_BASE_URL=http://{cfg.host}:{cfg.port} TINKER_API_KEY=<the key>", flush=True)
    uvicorn.run(create_app(server), host=cfg.host, port=cfg.port, log_level="warning")


class BackgroundServer:
    """``serve`` in a thread of this process, for tests and notebooks: ``with BackgroundServer(cfg) as s:``
    gives ``s.url`` and ``s.server``; leaving the block shuts it down."""

    def __init__(self, cfg: ServeConfig):
        import threading

        import uvicorn

        self.server = Server(cfg)
        self._uv = uvicorn.Server(uvicorn.Config(create_app(self.server), host=cfg.host, port=cfg.port,
                                                 log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._uv.run, name="lora-engine-http", daemon=True)
        self.url = f"http://{cfg.host}:{cfg.port}"

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._uv.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._uv.should_exit = True
        self._thread.join(60)
