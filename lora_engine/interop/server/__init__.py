"""``lora-engine serve``: the official Tinker SDK (``tinker`` 0.38) trains and samples against one
lora-engine base model over HTTP. Needs the ``serve`` extra (``pip install 'lora-engine[serve]'``:
FastAPI, uvicorn, and ``tinker`` for its protobuf schema); nothing in the core imports this package.

    app.py        ServeConfig, Server (state, ownership, submit helpers)
    http.py       the FastAPI app (auth, body caps), serve (the CLI), BackgroundServer (tests, notebooks)
    routes.py     the REST endpoints the SDK calls
    schemas.py    their JSON request bodies (pydantic, bounds checked)
    wire.py       protobuf bodies <-> the client's Batch; results out
    scheduler.py  futures, seq_id ordering per model, token-capped round-robin batches, the engine thread
    backend.py    what the engine thread runs on the in-process Client (one adapter per training client)
    sampler.py    batched decoding with per-request sampling parameters; prompt log-probs
    store.py      sessions, models and checkpoints on disk; tinker:// paths; ownership
"""
