"""Sweep analysis: gain, seed spread, negative-gain risk, token efficiency, Pareto frontier.

Input is the sweep runner's ``RUN_DIR/results.csv``, one row per run (one adapter trained for
a fixed number of steps), read by :func:`load_results` into a list of dicts with typed values.
Every other function takes such a list (or any list of dicts with the same keys) and returns
plain dicts: no pandas, numpy only for arithmetic.

Definitions (study A: the rank x batch x seed sweep of Qwen3-8B, implemented exactly)
-------------------------------------------------------------------------------------
- run: one row. A run is *usable* when ``status == "done"`` (a missing status counts as done)
  and its gain is finite. Every other run (``status == "failed"``, or a NaN/empty gain) is
  *excluded* from every statistic and counted in ``n_failed``.
- gain = final_score - base_score (taken from the ``gain`` column; computed from the two
  scores when that column is absent or empty).
- configuration = the values of :data:`CONFIG_COLUMNS`: rank, batch_size, lr, method, alpha,
  reward_regime (study C), prompts_per_step, samples_per_prompt, steps. Seed, run id, ``group`` (which adapters shared
  a base and a batch: an execution detail) and the results are not part of it, so two runs of
  one configuration differ only in seed.
- per configuration over its usable seeds: mean gain; sample standard deviation (ddof=1,
  NaN for a single seed because one sample has no spread; 0 would claim a certainty we do not
  have); best and worst seed; mean-best gap = best - mean (latent upside not delivered
  reliably); negative-gain risk = fraction of seeds with gain strictly < 0 (a gain of exactly
  0 is not a loss); mean tokens; token efficiency = mean gain / mean tokens (per token; the
  report prints it per million tokens, the unit of study A's 0.001344 -> 0.000267).
- family (study A's "rank family", "batch family"): all usable runs that share one value of a
  configuration column, pooled across every other column and seed; the same statistics over
  the pooled runs. With unequal seed counts the pooled mean weights each configuration by its
  number of usable seeds.
- relative entropy change = (H_final - H_initial) / H_initial of mean token entropy.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lora_engine.rl.metrics import avg_at_k, pass_at_k
from lora_engine.studies.results import INT_COLUMNS, STRING_COLUMNS, batch_size

__all__ = [
    "CONFIG_COLUMNS",
    "load_results",
    "config_key",
    "sort_key",
    "usable",
    "summarize",
    "families",
    "pareto_frontier",
    "footprint_bytes",
    "seed_runs_for_budget",
    "relative_entropy_change",
    "pass_at_k",
    "avg_at_k",
]

CONFIG_COLUMNS = (
    "rank", "batch_size", "lr", "method", "alpha", "reward_regime", "prompts_per_step", "samples_per_prompt",
    "steps",
)

# --- reading -----------------------------------------------------------------------------------

def _parse_value(column: str, text: str | None):
    """One CSV cell -> str for :data:`STRING_COLUMNS`, else int/float; empty -> NaN (or "")."""
    text = (text or "").strip()
    if column in STRING_COLUMNS:
        return text
    if text == "" or text.lower() in ("nan", "none", "null"):
        return math.nan
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text  # an extra column we do not know: keep it as written
    # "48000000.0" or "4.8e7" in an integer column is still a count.
    if column in INT_COLUMNS and math.isfinite(value) and value == int(value):
        return int(value)
    return value


def load_results(path: str | Path) -> list[dict]:
    """Read a sweep's ``results.csv`` into one dict per run with typed values.

    Strings: run_id, group, method, status; counts (rank, seed, batch_size, tokens, bytes ...)
    as int; everything else numeric as float. An empty cell becomes NaN (``""`` for the string
    columns), so optional columns may be missing or blank. Filled in when absent or blank: ``status``
    ("done"), ``batch_size`` (prompts_per_step * samples_per_prompt), ``gain``
    (final_score - base_score). If a run_id appears more than once (a resumed sweep wrote the
    run again) the last row wins.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an empty file or
    missing required columns (rank, seed, batch_size or prompts_per_step + samples_per_prompt,
    gain or base_score + final_score).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the sweep first or pass its RUN_DIR/results.csv")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise ValueError(f"{path} is empty (no header); re-run the sweep runner that writes it")
        raw = list(reader)
    if not raw:
        raise ValueError(f"{path} has a header but no runs; wait for the sweep to finish a run")
    missing = [c for c in ("rank", "seed") if c not in header]
    if "batch_size" not in header and not {"prompts_per_step", "samples_per_prompt"} <= set(header):
        missing.append("batch_size (or prompts_per_step and samples_per_prompt)")
    if "gain" not in header and not {"base_score", "final_score"} <= set(header):
        missing.append("gain (or base_score and final_score)")
    if missing:
        raise ValueError(
            f"{path} lacks required column(s) {', '.join(missing)}; it has {header}. "
            "Write results with the sweep runner, or add the columns"
        )
    rows: dict = {}
    for i, record in enumerate(raw):
        row = {k.strip(): _parse_value(k.strip(), v) for k, v in record.items() if k is not None}
        _fill_derived(row)
        key = row.get("run_id") or ("line", i)
        rows.pop(key, None)  # a re-written run moves to where its last row was
        rows[key] = row
    return list(rows.values())


def _fill_derived(row: dict) -> None:
    """Fill status, batch_size and gain from other columns where the CSV left them out."""
    row["status"] = (row.get("status") or "done").lower()
    if not _finite(row.get("batch_size")):
        pps, spp = row.get("prompts_per_step"), row.get("samples_per_prompt")
        if _finite(pps) and _finite(spp):
            row["batch_size"] = batch_size(pps, spp)
    if not _finite(row.get("gain")):
        base, final = row.get("base_score"), row.get("final_score")
        row["gain"] = final - base if _finite(base) and _finite(final) else math.nan


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(row: dict, column: str) -> float:
    """``row[column]`` as a float; NaN when missing, empty or not a number."""
    value = row.get(column)
    return float(value) if _finite(value) else math.nan


# --- configurations ------------------------------------------------------------------------------

def config_key(row: dict) -> tuple:
    """The configuration of a run: its values of :data:`CONFIG_COLUMNS`, in that order.

    Missing or NaN values become None so that two runs that both lack a column compare equal
    (NaN != NaN would split them into one configuration per run).
    """
    key = []
    for column in CONFIG_COLUMNS:
        value = row.get(column)
        if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
            value = None
        key.append(value)
    return tuple(key)


def sort_key(values: Iterable) -> tuple:
    """A total order over tuples mixing numbers, strings and None (None last)."""
    out = []
    for v in values:
        if v is None:
            out.append((2, 0, ""))
        elif isinstance(v, (int, float)):
            out.append((0, v, ""))
        else:
            out.append((1, 0, str(v)))
    return tuple(out)


def usable(row: dict) -> bool:
    """A run counts when it finished (``status == "done"``) with a finite gain."""
    return str(row.get("status") or "done").lower() == "done" and _finite(row.get("gain"))


def relative_entropy_change(h0: float, h1: float) -> float:
    """``(h1 - h0) / h0``: relative change of mean token entropy from ``h0`` (initial) to ``h1``.

    NaN when either value is missing or not finite, or when ``h0 <= 0`` (entropy is >= 0, and a
    change relative to zero entropy is undefined).
    """
    if not (_finite(h0) and _finite(h1)) or h0 <= 0:
        return math.nan
    return (float(h1) - float(h0)) / float(h0)


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _first_finite(rows: Sequence[dict], column: str):
    """A per-configuration constant (footprint): the first finite value among ``rows``."""
    for row in rows:
        if _finite(row.get(column)):
            return row[column]
    return math.nan


def _gain_stats(runs: Sequence[dict]) -> dict:
    """Gain statistics over usable ``runs`` (see the module docstring for each definition)."""
    gains = np.array([float(r["gain"]) for r in runs], dtype=np.float64)
    n = len(gains)
    if n == 0:
        nan = math.nan
        return dict(n_seeds=0, mean_gain=nan, sd_gain=nan, best_gain=nan, worst_gain=nan,
                    mean_best_gap=nan, risk=nan, mean_tokens=nan, token_efficiency=nan)
    mean = float(gains.mean())
    mean_tokens = _nanmean([_num(r, "tokens") for r in runs])
    efficiency = mean / mean_tokens if math.isfinite(mean_tokens) and mean_tokens > 0 else math.nan
    return dict(
        n_seeds=n,
        mean_gain=mean,
        sd_gain=float(gains.std(ddof=1)) if n > 1 else math.nan,
        best_gain=float(gains.max()),
        worst_gain=float(gains.min()),
        mean_best_gap=float(gains.max()) - mean,
        risk=float((gains < 0).sum()) / n,
        mean_tokens=mean_tokens,
        token_efficiency=efficiency,
    )


def _optional_means(runs: Sequence[dict]) -> dict:
    """Means of the optional per-run measurements (NaN where no run has them)."""
    return dict(
        mean_base_score=_nanmean([_num(r, "base_score") for r in runs]),
        mean_final_score=_nanmean([_num(r, "final_score") for r in runs]),
        entropy_change=_nanmean([relative_entropy_change(_num(r, "entropy_initial"), _num(r, "entropy_final"))
                                 for r in runs]),
        mean_pass_at_k_base=_nanmean([_num(r, "pass_at_k_base") for r in runs]),
        mean_pass_at_k_final=_nanmean([_num(r, "pass_at_k_final") for r in runs]),
        k=_first_finite(runs, "k"),
        mean_wall_s=_nanmean([_num(r, "wall_s") for r in runs]),
    )


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One dict per configuration (see :func:`config_key`), sorted by rank, batch size, lr, ...

    Keys: the :data:`CONFIG_COLUMNS`; ``n_seeds`` (usable runs), ``n_failed`` (excluded runs);
    ``mean_gain``, ``sd_gain`` (ddof=1; NaN for one seed), ``best_gain``, ``worst_gain``,
    ``mean_best_gap`` (best - mean), ``risk`` (fraction of seeds with gain < 0),
    ``mean_tokens``, ``token_efficiency`` (mean gain / mean tokens, per token);
    ``trainable_params``, ``optimizer_bytes``, ``checkpoint_bytes`` (constant per configuration:
    the first finite value over all its runs, failed ones included, since the footprint does
    not depend on the outcome); ``entropy_change`` (mean over seeds of the relative entropy
    change), ``mean_base_score``, ``mean_final_score``, ``mean_pass_at_k_base``,
    ``mean_pass_at_k_final``, ``k``, ``mean_wall_s``; ``seeds`` and ``gains`` (the usable
    runs' seeds and gains, in seed order, for plots). Statistics of a configuration with no
    usable run are NaN.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[config_key(row)].append(row)
    out = []
    for key in sorted(groups, key=sort_key):
        runs = groups[key]
        ok = sorted((r for r in runs if usable(r)), key=lambda r: sort_key([r.get("seed")]))
        summary = dict(zip(CONFIG_COLUMNS, key))
        summary["n_failed"] = len(runs) - len(ok)
        summary.update(_gain_stats(ok))
        for column in ("trainable_params", "optimizer_bytes", "checkpoint_bytes"):
            summary[column] = _first_finite(runs, column)
        summary.update(_optional_means(ok))
        summary["seeds"] = [r.get("seed") for r in ok]
        summary["gains"] = [float(r["gain"]) for r in ok]
        out.append(summary)
    return out


def families(rows: Sequence[dict], by: str = "rank") -> list[dict]:
    """Study A's families: all usable runs sharing one value of ``by``, pooled over the rest.

    ``by="rank"``: each rank's runs across every batch size and seed (study A: 4 batch sizes x 6
    seeds = 24 runs per rank); ``by="batch_size"``: each batch size across every rank and seed.
    Any other configuration column works too (``"method"``, ``"lr"``). Runs are pooled across
    everything else, methods and learning rates included: filter ``rows`` first to compare
    within one. Returns one dict per value, sorted: ``by``'s value, ``n_configs``, ``n_failed``
    and the statistics of :func:`summarize` over the pooled runs (``n_seeds`` is the number of
    pooled runs), plus ``entropy_change``.
    """
    if by not in CONFIG_COLUMNS:
        raise ValueError(f"families(by={by!r}): use one of the configuration columns {CONFIG_COLUMNS}")
    groups: dict = defaultdict(list)
    for row in rows:
        groups[config_key(row)[CONFIG_COLUMNS.index(by)]].append(row)
    out = []
    for value in sorted(groups, key=lambda v: sort_key([v])):
        runs = groups[value]
        ok = [r for r in runs if usable(r)]
        family = {by: value, "n_configs": len({config_key(r) for r in runs}), "n_failed": len(runs) - len(ok)}
        family.update(_gain_stats(ok))
        family["entropy_change"] = _optional_means(ok)["entropy_change"]
        out.append(family)
    return out


# --- Pareto frontier ------------------------------------------------------------------------------

def pareto_frontier(points: Sequence, x: str = "mean_tokens", y: str = "mean_gain") -> list:
    """The non-dominated points: fewest tokens (``x``, minimised) for the most gain (``y``, maximised).

    ``points`` are dicts (e.g. :func:`summarize` output, read through keys ``x`` and ``y``) or
    ``(x, y)`` pairs. Point p dominates q when ``p.x <= q.x`` and ``p.y >= q.y`` with at least
    one strict. Ties: two points with equal x and equal y do not dominate each other, so both
    are kept; a point with equal x but lower y, or equal y but more tokens, is dominated.
    Points with a NaN/inf coordinate are never on the frontier. Returns the frontier's points
    themselves (same objects), sorted by x ascending (then input order), so gain rises
    strictly along it.
    """
    def coords(p) -> tuple[float, float]:
        if isinstance(p, dict):
            return _num(p, x), _num(p, y)
        px, py = p
        return (float(px) if _finite(px) else math.nan), (float(py) if _finite(py) else math.nan)

    finite = [(i, *coords(p)) for i, p in enumerate(points)]
    finite = [(i, px, py) for i, px, py in finite if math.isfinite(px) and math.isfinite(py)]
    finite.sort(key=lambda t: (t[1], -t[2], t[0]))
    frontier, best_y, last = [], -math.inf, None
    for i, px, py in finite:
        if py > best_y or (px, py) == last:
            frontier.append(points[i])
            best_y, last = py, (px, py)
    return frontier


# --- budget ---------------------------------------------------------------------------------------

def footprint_bytes(row: dict, bytes_per_param: int = 4) -> float:
    """Training memory one adapter adds on top of the shared base: weights + optimizer state.

    ``trainable_params * bytes_per_param + optimizer_bytes`` (fp32 master weights by default;
    pass ``bytes_per_param=8`` to count fp32 gradients too). NaN when either column is missing.
    Activations are left out: they scale with batch and sequence length, not with rank.
    """
    params, opt = _num(row, "trainable_params"), _num(row, "optimizer_bytes")
    return params * bytes_per_param + opt


def seed_runs_for_budget(rows: Sequence[dict], budget_bytes: float, bytes_per_param: int = 4) -> list[dict]:
    """How many seed-runs of each rank a fixed memory budget buys (study A's re-reading).

    The engine trains adapters side by side on one shared base, so the scarce resource is the
    memory each adapter adds: its :func:`footprint_bytes` (weights + optimizer state, linear in
    rank). For each (method, rank) seen in ``rows`` (failed runs included: the footprint does
    not depend on the outcome) ``seed_runs = floor(budget_bytes / footprint)``, using the
    largest footprint among its runs so that the count always fits. Returns dicts with
    ``method``, ``rank``, ``trainable_params``, ``optimizer_bytes``, ``footprint_bytes`` and
    ``seed_runs``, sorted by method then rank; (method, rank) pairs whose footprint is unknown
    are left out.
    """
    if not _finite(budget_bytes) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row.get("method") or "", row.get("rank"))].append(row)
    out = []
    for method, rank in sorted(groups, key=sort_key):
        runs = groups[(method, rank)]
        sizes = [(footprint_bytes(r, bytes_per_param), r) for r in runs]
        sizes = [(b, r) for b, r in sizes if math.isfinite(b) and b > 0]
        if not sizes:
            continue
        size, row = max(sizes, key=lambda t: t[0])
        out.append(dict(method=method, rank=rank, trainable_params=row["trainable_params"],
                        optimizer_bytes=row["optimizer_bytes"], footprint_bytes=size,
                        seed_runs=int(budget_bytes // size)))
    if not out:
        raise ValueError(
            "no run has both trainable_params and optimizer_bytes; the sweep runner must write them "
            "to count seed-runs per budget"
        )
    return out
