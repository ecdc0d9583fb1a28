"""Write-then-rename: a file (or directory) appears under its final name only when complete.

The one home of crash-safe writes: PEFT adapter files, checkpoints, per-run results. A crash
mid-write leaves at most a hidden ``.NAME.tmp`` beside the previous version.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomic(path, write) -> Path:
    """``write(tmp_path)`` fills a temporary sibling of ``path``, which then replaces ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_atomic(path, lambda p: p.write_text(text))


def write_json_atomic(path, obj, **dump_kwargs) -> Path:
    return write_text_atomic(path, json.dumps(obj, **{"indent": 2, **dump_kwargs}))
