"""The per-run results schema: one row per run in a sweep's ``results.csv``.

The one definition of its columns and their types: the sweep writes rows with it, ``analysis``
reads them back with it. A run is one adapter trained for a fixed number of steps; its
configuration columns come first, then its scores, costs and status; ``error`` is empty for a
finished run and holds one line (the exception) for a run whose group failed (status "failed").
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

# column -> type (str, int or float), in the order results.csv holds them.
COLUMNS: dict[str, type] = {
    "run_id": str, "group": str, "rank": int, "alpha": float, "method": str, "reward_regime": str, "lr": float,
    "seed": int,
    "prompts_per_step": int, "samples_per_prompt": int, "batch_size": int, "steps": int,
    "base_score": float, "final_score": float, "gain": float, "tokens": int, "trainable_params": int,
    "optimizer_bytes": int, "checkpoint_bytes": int, "entropy_initial": float, "entropy_final": float,
    "pass_at_k_base": float, "pass_at_k_final": float, "k": int, "wall_s": float, "status": str,
    "error": str,
}
FIELDS = tuple(COLUMNS)
STRING_COLUMNS = tuple(c for c, t in COLUMNS.items() if t is str)
INT_COLUMNS = tuple(c for c, t in COLUMNS.items() if t is int)


def batch_size(prompts_per_step, samples_per_prompt) -> int:
    """Sequences per step: the batch size of study A (prompts x samples per prompt)."""
    return int(prompts_per_step) * int(samples_per_prompt)


def write_csv(path, rows) -> Path:
    """``rows`` (dicts) as results.csv; missing columns are left empty, unknown keys dropped."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FIELDS))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    return path


# The training curves: one row per run per step (``curves.csv``, beside results.csv), the
# per-step diagnostics of the trainer's log (study C's collapse signature: an advantage-std
# spike, then response length saturating and truncation rising).
CURVE_COLUMNS = ("step", "reward_mean", "accuracy", "adv_std", "response_len", "truncated_frac", "kl", "entropy")
CURVE_FILE = "curve.csv"


def write_curve(run_dir, log_path, adapter: int) -> None:
    """``run_dir/curve.csv``: adapter ``adapter``'s rows of a group's ``log.jsonl``."""
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    with open(Path(run_dir) / CURVE_FILE, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CURVE_COLUMNS))
        w.writeheader()
        for r in rows:
            if r.get("adapter") == adapter:
                w.writerow({k: r.get(k, "") for k in CURVE_COLUMNS})


def write_curves(out_dir) -> Path | None:
    """``out_dir/curves.csv`` from every ``runs/<id>/curve.csv`` (run_id first); None when there are none."""
    out_dir = Path(out_dir)
    parts = sorted((out_dir / "runs").glob(f"*/{CURVE_FILE}"))
    if not parts:
        return None
    path = out_dir / "curves.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run_id", *CURVE_COLUMNS])
        w.writeheader()
        for part in parts:
            with open(part, newline="") as g:
                for r in csv.DictReader(g):
                    w.writerow({"run_id": part.parent.name, **r})
    return path
