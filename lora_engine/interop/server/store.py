"""The server's store on disk: sessions, models and checkpoints, so a restarted server serves
the adapters saved before it stopped.

    <store>/server.json                                  base model it was made for
    <store>/sessions/<session_id>.json                   {session_id, owner, project_id, created, ended}
    <store>/models/<model_id>.json                       {model_id, session_id, owner, base_model, lora_config, spec}
    <store>/checkpoints/<model_id>/<kind>/<name>/        a PEFT adapter directory (kind "weights"
                                                         adds optimizer.safetensors + client_state.json)
    <store>/checkpoints/<model_id>/<kind>/<name>.json    {path, owner, model_id, kind, name, base_model, created}

``tinker://<model_id>/<kind>/<name>`` (kind ``weights`` from ``save_state``, ``sampler_weights``
from ``save_weights_for_sampler``) maps onto ``checkpoints/<model_id>/<kind>/<name>/``. Every
record is written atomically (``lora_engine.atomic``); a checkpoint directory is filled under a
temporary name and renamed into place, and its record is written last, so a crash mid-save leaves
no checkpoint a later server would serve half-written.

Ownership: a checkpoint belongs to its session's *owner*, the project id the session was
created with (``ServiceClient(project_id=...)`` / ``TINKER_PROJECT_ID``), else the session
itself. Only the same owner may load it or sample from it; a project id is how a later
session (e.g. after a restart) reaches earlier checkpoints.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from lora_engine.atomic import write_json_atomic

KINDS = ("weights", "sampler_weights")
SCHEME = "tinker://"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9:._-]{0,199}$")


class StoreError(ValueError):
    """A path or name the store refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_name(name: str, what: str = "checkpoint name") -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(400, f"{what} {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
                              "not starting with '.' or '-'")
    return name


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise StoreError(400, f"{what} {value!r} is not a valid id")
    return value


def tinker_path(model_id: str, kind: str, name: str) -> str:
    return f"{SCHEME}{model_id}/{kind}/{name}"


def parse_path(path: str) -> tuple[str, str, str]:
    """``tinker://<model_id>/<kind>/<name>`` -> (model_id, kind, name), validated."""
    if not isinstance(path, str) or not path.startswith(SCHEME):
        raise StoreError(400, f"path {path!r} is not a tinker:// path: use the path save_state or save_weights_"
                              "for_sampler returned (tinker://<model_id>/<weights|sampler_weights>/<name>)")
    parts = path[len(SCHEME):].split("/")
    if len(parts) != 3 or parts[1] not in KINDS:
        raise StoreError(400, f"path {path!r} must be tinker://<model_id>/<weights|sampler_weights>/<name>")
    return check_id(parts[0], "model id in path"), parts[1], check_name(parts[2])


class Store:
    """Records under one directory; every method is safe to call from any one thread at a time
    per record (the server writes each record from one place)."""

    def __init__(self, root, base_model: str):
        self.root = Path(root).resolve()
        for sub in ("sessions", "models", "checkpoints"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        info = self.root / "server.json"
        if info.exists():
            self.info = json.loads(info.read_text())
        else:
            self.info = {"format": 1, "base_model": base_model, "created": time.time()}
            write_json_atomic(info, self.info)

    # -- sessions and models -----------------------------------------------------------------------
    def save_session(self, record: dict) -> None:
        write_json_atomic(self.root / "sessions" / f"{record['session_id']}.json", record)

    def session(self, session_id: str) -> dict | None:
        return self._read(self.root / "sessions" / f"{check_id(session_id, 'session_id')}.json")

    def end_sessions_from_before(self, now: float) -> int:
        """Mark every session recorded by an earlier server process as ended (its models died
        with that process; the SDK learns it from a 410 on heartbeat). Returns how many."""
        n = 0
        for f in (self.root / "sessions").glob("*.json"):
            rec = json.loads(f.read_text())
            if not rec.get("ended"):
                rec["ended"] = {"at": now, "reason": "server restarted"}
                write_json_atomic(f, rec)
                n += 1
        return n

    def save_model(self, record: dict) -> None:
        write_json_atomic(self.root / "models" / f"{record['model_id']}.json", record)

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoint_dir(self, model_id: str, kind: str, name: str) -> Path:
        return self.root / "checkpoints" / check_id(model_id, "model_id") / kind / check_name(name)

    def checkpoint(self, path: str) -> tuple[dict, Path]:
        """(record, directory) of a saved checkpoint; 404 if there is none."""
        model_id, kind, name = parse_path(path)
        directory = self.checkpoint_dir(model_id, kind, name)
        rec = self._read(directory.with_name(f"{name}.json"))
        if rec is None or not directory.is_dir():
            raise StoreError(404, f"no checkpoint at {path}")
        return rec, directory

    def readable(self, path: str, owner: str) -> tuple[dict, Path]:
        """``checkpoint(path)`` if ``owner`` owns it, else 403."""
        rec, directory = self.checkpoint(path)
        if rec["owner"] != owner:
            raise StoreError(403, f"{path} belongs to another session or project: a session may only load or "
                                  "sample its own checkpoints (or its project's: ServiceClient(project_id=...))")
        return rec, directory

    def write_checkpoint(self, record: dict, write, overwrite: bool) -> str:
        """Fill a new checkpoint directory with ``write(tmp_dir)``, rename it into place, then
        write its record. ``record`` holds model_id, kind, name, owner, base_model."""
        model_id, kind, name = record["model_id"], record["kind"], record["name"]
        final = self.checkpoint_dir(model_id, kind, name)
        meta = final.with_name(f"{name}.json")
        if meta.exists() and not overwrite:
            raise StoreError(409, f"a checkpoint named {name!r} already exists for this model: pick another name "
                                  "or pass overwrite=True")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            write(tmp)
            meta.unlink(missing_ok=True)  # no record points at the directory while it is swapped
            if final.exists():
                old = final.with_name(f".{name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        path = tinker_path(model_id, kind, name)
        write_json_atomic(meta, {**record, "path": path, "created": time.time()})
        return path

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
