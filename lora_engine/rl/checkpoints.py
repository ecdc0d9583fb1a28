"""Where a training run's checkpoints live and how they are written: the one home of the layout.

    OUT/checkpoints/step_000050/adapter_<id>/   the adapter in PEFT format (``peft_format.save_adapter``)
                               optimizers.pt    {str(id): AdamW state_dict}
                               critic_<id>/     PPO: policy id's critic LoRA in PEFT format
                               critics.pt       PPO: {"optimizers": {str(policy id): critic AdamW
                                                state_dict}, "heads": the value heads' state}
                               state.json       {"step", "tokens", "config"}
    OUT/checkpoints/latest                      the name of the newest complete checkpoint

A checkpoint is filled in a hidden temporary directory and renamed into place, then ``latest``
is replaced atomically: a crash at any point leaves the previous checkpoint readable (a re-save
of the same step parks the old directory as ``.old_<name>`` for the instant between renames,
and ``latest_checkpoint`` finds it there).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lora_engine.atomic import write_text_atomic

DIRNAME, LATEST = "checkpoints", "latest"
STATE_FILE, OPTIMIZERS_FILE, CRITICS_FILE = "state.json", "optimizers.pt", "critics.pt"


def adapter_dir(ckpt, a: int) -> Path:
    return Path(ckpt) / f"adapter_{a}"


def critic_dir(ckpt, a: int) -> Path:
    """Where policy ``a``'s critic adapter lives (PPO)."""
    return Path(ckpt) / f"critic_{a}"


def adapter_dirs(ckpt) -> dict[int, Path]:
    """{adapter id: directory} of a checkpoint, in id order."""
    found = {int(p.name.split("_", 1)[1]): p for p in Path(ckpt).glob("adapter_*")
             if p.is_dir() and p.name.split("_", 1)[1].isdigit()}
    return dict(sorted(found.items()))


def write_checkpoint(out, step: int, fill) -> Path:
    """``fill(directory)`` writes the checkpoint's files; the directory becomes
    ``OUT/checkpoints/step_<step>`` and ``latest`` names it, each switch atomic."""
    root = Path(out) / DIRNAME
    final, tmp = root / f"step_{step:06d}", root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    if final.exists():
        # Never delete the directory `latest` may name before its replacement is in place.
        old = root / f".old_{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    write_text_atomic(root / LATEST, final.name)
    return final


def latest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint of the run in ``out``, or None if it has none."""
    root = Path(out) / DIRNAME
    latest = root / LATEST
    if not latest.exists():
        return None
    ckpt = root / latest.read_text().strip()
    if not ckpt.exists() and (root / f".old_{ckpt.name}").exists():
        ckpt = root / f".old_{ckpt.name}"  # a crash between the two renames of a re-save
    return ckpt


def start_log(out: Path, resumed: bool, step: int) -> tuple[Path, Path]:
    """(log.jsonl, summary.json) of run directory ``out``: a fresh run in a used directory starts
    both over; a resumed one drops the log rows of steps after its checkpoint (redone, so each
    step is logged once)."""
    log_path, summary_path = out / "log.jsonl", out / "summary.json"
    if not resumed:
        log_path.unlink(missing_ok=True)
        summary_path.unlink(missing_ok=True)
    elif log_path.exists():
        kept = [l for l in log_path.read_text().splitlines() if json.loads(l)["step"] < step]
        log_path.write_text("".join(l + "\n" for l in kept))
    return log_path, summary_path
