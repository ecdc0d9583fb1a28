"""The per-run results schema: one row per run in a sweep's ``results.csv``.

The one definition of its columns and their types: the sweep writes rows with it, ``analysis``
reads them back with it. A run is one adapter trained for a fixed number of steps; its
configuration columns come first, then its scores, costs and status; ``error`` is empty for a
finished run and holds one line (the exception) for a run whose group failed (status "failed").
"""
from __future__ import annotations

import csv
from pathlib import Path

# column -> type (str, int or float), in the order results.csv holds them.
COLUMNS: dict[str, type] = {
    "run_id": str, "group": str, "rank": int, "alpha": float, "method": str, "loss_type": str, "lr": float, "seed": int,
    "prompts_per_step": int, "samples_per_prompt": int, "batch_size": int, "steps": int,
    "base_score": float, "final_score": float, "gain": float, "tokens": int, "trainable_params": int,
    "base_params": int, "optimizer_bytes": int, "checkpoint_bytes": int, "entropy_initial": float, "entropy_final": float,
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
