"""A sweep's ``report.md`` and figures, regenerated from ``RUN_DIR/results.csv`` alone.

``write_report(run_dir)`` reads the results, summarises them with :mod:`lora_engine.studies.analysis`
and writes ``RUN_DIR/report.md`` plus PNGs in ``RUN_DIR/figures/`` (linked relatively, so the
folder can be moved or committed as is). Running it again replaces both; nothing else in the
run folder is read or written. From a shell: ``python -m lora_engine.studies.report RUN_DIR``.

Figures split by *variant* only when needed: a configuration column other than rank and batch
size (method, lr, alpha, ...) becomes part of a figure's series label when two configurations
with the same rank and batch size differ in it. A column that is a function of rank and batch
(a rank-matched lr, prompts_per_step growing with batch) would otherwise split every line into
one-point series.

matplotlib is needed (``pip install matplotlib``); figures are drawn on ``matplotlib.figure.Figure``
objects directly, never through pyplot, so the caller's backend and global state are untouched
and nothing needs a display.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from lora_engine.studies.analysis import (
    CONFIG_COLUMNS,
    config_key,
    families,
    load_results,
    pareto_frontier,
    seed_runs_for_budget,
    sort_key,
    summarize,
    usable,
)

__all__ = ["FIGURES", "write_report", "main"]

# File stem -> caption, in the order the report shows them.
FIGURES = {
    "gain_vs_rank": "Mean gain vs rank per batch size; bars: seed sd, dots: single seeds",
    "risk_heatmap": "Negative-gain risk P(gain < 0) over seeds, rank x batch size",
    "efficiency_vs_rank": "Token efficiency (gain per 1M training tokens) vs rank",
    "pareto": "Mean gain over token budget; filled: Pareto frontier, hollow: dominated",
    "mean_vs_best": "Rank family: mean gain vs best and worst seed",
    "gain_distributions": "Per-configuration gain distribution over seeds",
    "footprint": "Trainable parameters and optimizer state vs rank",
}
BUDGET_BYTES = 1 << 30  # the budget table: seed-runs per GiB of adapter + optimizer memory
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
DASH = "—"


# --- formatting -----------------------------------------------------------------------------------

def _ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _gain(v) -> str:
    return f"{v:+.4f}" if _ok(v) else DASH


def _plain(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if _ok(v) else DASH


def _pct(v, signed: bool = False) -> str:
    return (f"{100 * v:+.1f}%" if signed else f"{100 * v:.1f}%") if _ok(v) else DASH


def _per_million(v) -> str:
    # Study A prints efficiency per million tokens (0.0645 gain / 48M tokens = 0.001344).
    return f"{v * 1e6:.6f}" if _ok(v) else DASH


def _count(v) -> str:
    if not _ok(v):
        return DASH
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v:.0f}"


def _bytes(v) -> str:
    if not _ok(v):
        return DASH
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(v) >= scale:
            return f"{v / scale:.1f} {unit}"
    return f"{v:.0f} B"


def _value(v) -> str:
    """A configuration value in a table cell (``|`` would end the cell)."""
    if v is None:
        return DASH
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --- variants -------------------------------------------------------------------------------------

def _variant_columns(summaries: Sequence[dict]) -> list[str]:
    """Configuration columns that differ between two configurations of one (rank, batch) cell."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        cells[(s["rank"], s["batch_size"])].append(s)
    out = []
    for column in CONFIG_COLUMNS:
        if column in ("rank", "batch_size"):
            continue
        if any(len({str(s[column]) for s in cell}) > 1 for cell in cells.values()):
            out.append(column)
    return out


def _variant(s: dict, columns: Sequence[str]) -> str:
    return " ".join(f"{c}={_value(s.get(c))}" for c in columns)


def _rank_ok(s: dict) -> bool:
    return _ok(s.get("rank")) and s["rank"] > 0


# --- figures --------------------------------------------------------------------------------------

def _figure(width: float = 7.0, height: float = 4.5, ncols: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("write_report draws figures with matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _rank_axis(ax, ranks: Sequence[int]) -> None:
    """log2 rank axis with a tick at every rank of the sweep, labelled as an integer."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(ranks))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(int(r)) for r in ticks])
    ax.minorticks_off()
    ax.set_xlabel("LoRA rank")


def _series(summaries: Sequence[dict], columns: Sequence[str]) -> dict[tuple, list[dict]]:
    """(variant label, batch size) -> that series' configurations sorted by rank."""
    out: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        if _rank_ok(s) and s["n_seeds"] > 0:
            out[(_variant(s, columns), s["batch_size"])].append(s)
    return {k: sorted(v, key=lambda s: s["rank"]) for k, v in sorted(out.items(), key=lambda kv: sort_key(kv[0]))}


def _style(series_keys: Sequence[tuple]):
    """Colour by batch size, marker and line style by variant."""
    batches = sorted({b for _, b in series_keys}, key=lambda b: sort_key([b]))
    variants = sorted({v for v, _ in series_keys})
    colours = [f"C{i % 10}" for i in range(len(batches))]

    def style(key):
        v, b = key
        i = variants.index(v)
        return dict(color=colours[batches.index(b)], marker=MARKERS[i % len(MARKERS)],
                    linestyle=LINESTYLES[i % len(LINESTYLES)])
    return style


def _label(key: tuple) -> str:
    variant, batch = key
    return f"batch {_value(batch)}" + (f", {variant}" if variant else "")


def _plot_gain_vs_rank(summaries, columns, path: Path) -> bool:
    series = _series(summaries, columns)
    if not series:
        return False
    fig, (ax,) = _figure()
    style = _style(list(series))
    n = len(series)
    for j, (key, ss) in enumerate(series.items()):
        # Spread series sideways (in log2 units) so error bars and seed dots do not overlap.
        shift = 2.0 ** (0.06 * (j - (n - 1) / 2))
        st = style(key)
        x = np.array([s["rank"] for s in ss], dtype=float) * shift
        sd = np.array([s["sd_gain"] if _ok(s["sd_gain"]) else 0.0 for s in ss])
        ax.errorbar(x, [s["mean_gain"] for s in ss], yerr=sd, capsize=3, label=_label(key), **st)
        for xi, s in zip(x, ss):
            ax.scatter([xi] * len(s["gains"]), s["gains"], s=10, alpha=0.35, color=st["color"],
                       linewidths=0)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    _rank_axis(ax, [s["rank"] for ss in series.values() for s in ss])
    ax.set_ylabel("gain (final - base score)")
    ax.set_title("Mean gain vs rank (bars: seed sd; dots: seeds)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def _plot_risk_heatmap(summaries, columns, path: Path) -> bool:
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for s in summaries:
        if s["n_seeds"] > 0 and s["rank"] is not None and s["batch_size"] is not None:
            by_variant[_variant(s, columns)].append(s)
    if not by_variant:
        return False
    variants = sorted(by_variant)
    ranks = sorted({s["rank"] for s in summaries if s["rank"] is not None}, key=lambda v: sort_key([v]))
    batches = sorted({s["batch_size"] for s in summaries if s["batch_size"] is not None},
                     key=lambda v: sort_key([v]))
    fig, axes = _figure(width=1.2 + 3.2 * len(variants) + 0.5 * len(batches) * len(variants),
                        height=1.5 + 0.45 * len(ranks), ncols=len(variants))
    image = None
    for ax, variant in zip(axes, variants):
        risk = np.full((len(ranks), len(batches)), np.nan)
        counts = {}
        for s in by_variant[variant]:
            i, j = ranks.index(s["rank"]), batches.index(s["batch_size"])
            risk[i, j] = s["risk"]
            counts[i, j] = (round(s["risk"] * s["n_seeds"]), s["n_seeds"])
        image = ax.imshow(np.ma.masked_invalid(risk), cmap="Reds", vmin=0.0, vmax=1.0,
                          origin="lower", aspect="auto")
        ax.set_facecolor("0.9")  # cells without a usable run
        for (i, j), (neg, n) in counts.items():
            ax.text(j, i, f"{100 * risk[i, j]:.0f}%\n{neg}/{n}", ha="center", va="center", fontsize=8,
                    color="white" if risk[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(batches)), [_value(b) for b in batches])
        ax.set_yticks(range(len(ranks)), [_value(r) for r in ranks])
        ax.set_xlabel("batch size (sequences per step)")
        ax.set_ylabel("LoRA rank")
        ax.set_title(f"P(gain < 0){' ' + variant if variant else ''}", fontsize="medium")
    fig.colorbar(image, ax=list(axes), label="negative-gain risk", shrink=0.9)
    fig.savefig(path, dpi=120)
    return True


def _plot_efficiency(summaries, rows, columns, path: Path) -> bool:
    series = {k: [s for s in ss if _ok(s["token_efficiency"])] for k, ss in _series(summaries, columns).items()}
    series = {k: ss for k, ss in series.items() if ss}
    if not series:
        return False
    fig, (ax,) = _figure()
    style = _style(list(series))
    for key, ss in series.items():
        ax.plot([s["rank"] for s in ss], [1e6 * s["token_efficiency"] for s in ss], label=_label(key), **style(key))
    for i, (variant, runs) in enumerate(sorted(_rows_by_variant(rows, columns).items())):
        fam = [f for f in families(runs, "rank") if _ok(f["token_efficiency"]) and _ok(f["rank"]) and f["rank"] > 0]
        if fam:
            ax.plot([f["rank"] for f in fam], [1e6 * f["token_efficiency"] for f in fam], color="black",
                    linewidth=2, linestyle=LINESTYLES[i % len(LINESTYLES)],
                    label="rank family" + (f", {variant}" if variant else ""))
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    _rank_axis(ax, [s["rank"] for ss in series.values() for s in ss])
    ax.set_ylabel("mean gain per 1M training tokens")
    ax.set_title("Token efficiency vs rank")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def _plot_pareto(summaries, columns, path: Path) -> bool:
    points = [s for s in summaries if _ok(s["mean_tokens"]) and _ok(s["mean_gain"])]
    if not points:
        return False
    frontier = pareto_frontier(points)
    on = {id(s) for s in frontier}
    fig, (ax,) = _figure()
    dominated = [s for s in points if id(s) not in on]
    ax.scatter([s["mean_tokens"] / 1e6 for s in dominated], [s["mean_gain"] for s in dominated],
               facecolors="none", edgecolors="0.55", s=36, label="dominated")
    fx = [s["mean_tokens"] / 1e6 for s in frontier]
    fy = [s["mean_gain"] for s in frontier]
    ax.step(fx, fy, where="post", color="C3", linewidth=1.5)
    ax.scatter(fx, fy, color="C3", s=44, zorder=3, label="Pareto frontier")
    for s, x, y in zip(frontier, fx, fy):
        text = f"r{_value(s['rank'])} b{_value(s['batch_size'])}"
        variant = _variant(s, columns)
        ax.annotate(text + (f" {variant}" if variant else ""), (x, y), textcoords="offset points",
                    xytext=(5, -10), fontsize=8)
    xs = [s["mean_tokens"] for s in points]
    if min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel("training tokens per run (millions)")
    ax.set_ylabel("mean gain over seeds")
    ax.set_title("Gain over token budget")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def _rows_by_variant(rows, columns) -> dict[str, list[dict]]:
    """Runs grouped by the variant label of their configuration (as :func:`_variant` names it)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        out[_variant(dict(zip(CONFIG_COLUMNS, config_key(r))), columns)].append(r)
    return dict(out)


def _plot_mean_vs_best(rows, columns, path: Path) -> bool:
    groups = {}
    for variant, runs in sorted(_rows_by_variant(rows, columns).items()):
        fam = [f for f in families(runs, "rank") if f["n_seeds"] > 0 and _ok(f["rank"]) and f["rank"] > 0]
        if fam:
            groups[variant] = fam
    if not groups:
        return False
    fig, (ax,) = _figure()
    for i, (variant, fam) in enumerate(groups.items()):
        x = [f["rank"] for f in fam]
        suffix = f", {variant}" if variant else ""
        colour = f"C{i % 10}"
        ax.fill_between(x, [f["mean_gain"] for f in fam], [f["best_gain"] for f in fam], color=colour,
                        alpha=0.15, linewidth=0)
        ax.plot(x, [f["best_gain"] for f in fam], color=colour, marker="^", linestyle="--", label="best seed" + suffix)
        ax.plot(x, [f["mean_gain"] for f in fam], color=colour, marker="o", linewidth=2, label="mean" + suffix)
        ax.plot(x, [f["worst_gain"] for f in fam], color=colour, marker="v", linestyle=":", label="worst seed" + suffix)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    _rank_axis(ax, [f["rank"] for fam in groups.values() for f in fam])
    ax.set_ylabel("gain over all batch sizes and seeds")
    ax.set_title("Mean vs best seed per rank (shaded: mean-best gap)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return True


def _plot_distributions(summaries, columns, path: Path) -> bool:
    ss = [s for s in summaries if s["n_seeds"] > 0]
    if not ss:
        return False
    fig, (ax,) = _figure(width=max(6.0, 0.42 * len(ss) + 1.5), height=4.5)
    positions = np.arange(len(ss))
    ax.boxplot([s["gains"] for s in ss], positions=positions, widths=0.6, showfliers=False,
               medianprops=dict(color="C1"))
    for x, s in zip(positions, ss):
        # Deterministic spread of the seed dots inside the box.
        offsets = np.linspace(-0.18, 0.18, len(s["gains"])) if len(s["gains"]) > 1 else np.zeros(1)
        ax.scatter(x + offsets, s["gains"], s=12, color="C0", alpha=0.7, zorder=3, linewidths=0)
    labels = []
    for s in ss:
        variant = _variant(s, columns)
        labels.append(f"r{_value(s['rank'])}\nb{_value(s['batch_size'])}" + (f"\n{variant}" if variant else ""))
    ax.set_xticks(positions, labels, fontsize=7)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_ylabel("gain per seed")
    ax.set_title("Gain distribution per configuration (box: quartiles; dots: seeds)")
    fig.savefig(path, dpi=120)
    return True


def _plot_footprint(summaries, path: Path) -> bool:
    by_method: dict[str, dict] = defaultdict(dict)
    for s in summaries:
        if _rank_ok(s):
            slot = by_method[_value(s["method"]) if s["method"] is not None else ""].setdefault(s["rank"], {})
            for column in ("trainable_params", "optimizer_bytes", "checkpoint_bytes"):
                if _ok(s[column]):
                    slot.setdefault(column, s[column])
    panels = (("trainable_params", "trainable parameters", 1.0),
              ("optimizer_bytes", "optimizer state (MiB)", 1 / (1 << 20)),
              ("checkpoint_bytes", "checkpoint (MiB)", 1 / (1 << 20)))
    panels = [p for p in panels if any(p[0] in v for m in by_method.values() for v in m.values())]
    if not panels:
        return False
    fig, axes = _figure(width=3.6 * len(panels) + 0.5, height=3.8, ncols=len(panels))
    for ax, (column, label, scale) in zip(axes, panels):
        ranks = []
        for i, (method, per_rank) in enumerate(sorted(by_method.items())):
            pts = sorted((r, v[column]) for r, v in per_rank.items() if column in v)
            if pts:
                ranks += [r for r, _ in pts]
                ax.plot([r for r, _ in pts], [y * scale for _, y in pts], marker=MARKERS[i % len(MARKERS)],
                        label=method or "adapter")
        ax.set_yscale("log")
        _rank_axis(ax, ranks)
        ax.set_ylabel(label)
        ax.legend(fontsize="small")
    fig.suptitle("Footprint per adapter vs rank")
    fig.savefig(path, dpi=120)
    return True


def _draw_figures(rows, summaries, columns, fig_dir: Path) -> list[str]:
    """Draw every figure that the data allows; returns the stems drawn."""
    draw = {
        "gain_vs_rank": lambda p: _plot_gain_vs_rank(summaries, columns, p),
        "risk_heatmap": lambda p: _plot_risk_heatmap(summaries, columns, p),
        "efficiency_vs_rank": lambda p: _plot_efficiency(summaries, rows, columns, p),
        "pareto": lambda p: _plot_pareto(summaries, columns, p),
        "mean_vs_best": lambda p: _plot_mean_vs_best(rows, columns, p),
        "gain_distributions": lambda p: _plot_distributions(summaries, columns, p),
        "footprint": lambda p: _plot_footprint(summaries, p),
    }
    return [stem for stem in FIGURES if draw[stem](fig_dir / f"{stem}.png")]


# --- markdown -------------------------------------------------------------------------------------

def _config_table(summaries, shown: Sequence[str]) -> str:
    has_pass = any(_ok(s["mean_pass_at_k_final"]) for s in summaries)
    header = [c.replace("_", " ") for c in shown] + [
        "seeds", "failed", "mean gain", "sd", "best", "worst", "mean-best gap", "P(gain<0)",
        "tokens", "gain / 1M tokens", "entropy change", "trainable params", "optimizer", "checkpoint"]
    if has_pass:
        k = next((s["k"] for s in summaries if _ok(s["k"])), None)
        name = f"pass@{_value(k)}" if k is not None else "pass@k"
        header += [f"{name} base", f"{name} final"]
    out = []
    for s in summaries:
        row = [_value(s[c]) for c in shown] + [
            str(s["n_seeds"]), str(s["n_failed"]), _gain(s["mean_gain"]), _plain(s["sd_gain"]),
            _gain(s["best_gain"]), _gain(s["worst_gain"]), _plain(s["mean_best_gap"]), _pct(s["risk"]),
            _count(s["mean_tokens"]), _per_million(s["token_efficiency"]), _pct(s["entropy_change"], signed=True),
            _count(s["trainable_params"]), _bytes(s["optimizer_bytes"]), _bytes(s["checkpoint_bytes"])]
        if has_pass:
            row += [_plain(s["mean_pass_at_k_base"]), _plain(s["mean_pass_at_k_final"])]
        out.append(row)
    return _table(header, out)


def _family_table(rows, columns, by: str) -> str:
    header = ([by.replace("_", " ")] + (["variant"] if columns else []) +
              ["configs", "runs", "failed", "mean gain", "sd", "best", "mean-best gap", "P(gain<0)",
               "tokens", "gain / 1M tokens", "entropy change"])
    out = []
    for variant, runs in sorted(_rows_by_variant(rows, columns).items()):
        for f in families(runs, by):
            out.append([_value(f[by])] + ([variant] if columns else []) + [
                str(f["n_configs"]), str(f["n_seeds"]), str(f["n_failed"]), _gain(f["mean_gain"]),
                _plain(f["sd_gain"]), _gain(f["best_gain"]), _plain(f["mean_best_gap"]), _pct(f["risk"]),
                _count(f["mean_tokens"]), _per_million(f["token_efficiency"]),
                _pct(f["entropy_change"], signed=True)])
    return _table(header, out)


def _pareto_section(summaries, shown) -> str:
    frontier = pareto_frontier(summaries)
    if not frontier:
        return "No configuration has both a finite mean gain and a token count, so there is no frontier."
    header = [c.replace("_", " ") for c in shown] + ["seeds", "tokens", "mean gain", "P(gain<0)", "gain / 1M tokens"]
    body = [[_value(s[c]) for c in shown] + [str(s["n_seeds"]), _count(s["mean_tokens"]), _gain(s["mean_gain"]),
                                             _pct(s["risk"]), _per_million(s["token_efficiency"])] for s in frontier]
    n = sum(1 for s in summaries if _ok(s["mean_tokens"]) and _ok(s["mean_gain"]))
    return (f"{len(frontier)} of {n} configurations are not dominated (no other configuration reaches at least "
            "the same mean gain with at most the same tokens, one of them strictly).\n\n" + _table(header, body))


def _budget_section(rows) -> str:
    try:
        budget = seed_runs_for_budget(rows, BUDGET_BYTES)
    except ValueError:
        return "The results have no trainable_params/optimizer_bytes columns, so no footprint is known."
    body = [[_value(b["method"] or None), _value(b["rank"]), _count(b["trainable_params"]),
             _bytes(b["optimizer_bytes"]), _bytes(b["footprint_bytes"]), str(b["seed_runs"])] for b in budget]
    return ("Footprint = trainable params x 4 B (fp32 weights) + optimizer state; activations and the shared "
            "base are left out. Seed-runs = floor(1 GiB / footprint): how many adapters of that rank "
            "1 GiB of memory trains side by side.\n\n"
            + _table(["method", "rank", "trainable params", "optimizer", "footprint", "seed-runs per GiB"], body))


def _headline(summaries, shown) -> list[str]:
    ok = [s for s in summaries if s["n_seeds"] > 0]
    if not ok:
        return []

    def name(s):
        return ", ".join(f"{c.replace('_', ' ')} {_value(s[c])}" for c in shown)

    best = max(ok, key=lambda s: s["mean_gain"])
    seed = max(ok, key=lambda s: s["best_gain"])
    lines = [f"- Best mean gain: {name(best)}: {_gain(best['mean_gain'])} over {best['n_seeds']} seed(s), "
             f"risk {_pct(best['risk'])}.",
             f"- Best single seed: {name(seed)}: {_gain(seed['best_gain'])} "
             f"(its mean {_gain(seed['mean_gain'])}, gap {_plain(seed['mean_best_gap'])})."]
    eff = [s for s in ok if _ok(s["token_efficiency"])]
    if eff:
        top = max(eff, key=lambda s: s["token_efficiency"])
        lines.append(f"- Most token-efficient: {name(top)}: {_per_million(top['token_efficiency'])} gain per 1M "
                     f"tokens ({_gain(top['mean_gain'])} at {_count(top['mean_tokens'])} tokens).")
    return lines


def _markdown(run_dir: Path, rows, summaries, columns, drawn) -> str:
    n_ok = sum(1 for r in rows if usable(r))
    excluded = [r for r in rows if not usable(r)]
    present = [c for c in CONFIG_COLUMNS if any(s[c] is not None for s in summaries)]
    shown = [c for c in present if c in ("rank", "batch_size") or len({str(s[c]) for s in summaries}) > 1]
    constant = [c for c in present if c not in shown]
    seeds = [s["n_seeds"] for s in summaries]
    lines = [
        f"# Sweep report: {run_dir.resolve().name}", "",
        "Generated from `results.csv` alone by `lora_engine.studies.report.write_report`; run it again to refresh.", "",
        f"- Runs: {len(rows)} ({n_ok} used, {len(excluded)} excluded: failed or without a finite gain).",
        f"- Configurations: {len(summaries)}; usable seeds per configuration: "
        f"{min(seeds)}{'' if min(seeds) == max(seeds) else '-' + str(max(seeds))}.",
    ]
    if constant:
        lines.append("- Same in every run: " + ", ".join(f"{c.replace('_', ' ')} {_value(summaries[0][c])}"
                                                         for c in constant) + ".")
    if excluded:
        ids = [str(r.get("run_id") or "?") for r in excluded]
        lines.append(f"- Excluded runs: {', '.join(ids[:20])}{' ...' if len(ids) > 20 else ''}.")
    if columns:
        lines.append(f"- Figures and family tables are split by {', '.join(columns)}: configurations with the "
                     "same rank and batch size differ there.")
    lines += [""] + _headline(summaries, shown) + [
        "", "## Definitions", "",
        "- gain = final - base score of one run; statistics use runs with status `done` and a finite gain.",
        "- sd: sample standard deviation over seeds (ddof=1), `—` for a single seed.",
        "- P(gain<0): fraction of seeds whose gain is strictly below 0 (negative-gain risk).",
        "- mean-best gap = best seed - mean: upside that the configuration does not deliver reliably.",
        "- tokens: prompt + completion tokens of the training rollouts, mean over seeds; gain / 1M tokens = "
        "mean gain / mean tokens x 10^6 (token efficiency).",
        "- entropy change: (H_final - H_initial) / H_initial of mean token entropy, mean over seeds.",
        "- Families (study A): every run sharing a rank (or a batch size), pooled over the other columns "
        "and seeds.",
        "", "## Per-configuration summary", "", _config_table(summaries, shown),
        "", "## Rank family", "", _family_table(rows, columns, "rank"),
        "", "## Batch family", "", _family_table(rows, columns, "batch_size"),
        "", "## Pareto set (tokens vs mean gain)", "", _pareto_section(summaries, shown),
        "", "## Seed-runs per GiB of adapter memory", "", _budget_section(rows),
        "", "## Figures", "",
    ]
    for stem in FIGURES:
        if stem in drawn:
            lines += [f"![{FIGURES[stem]}](figures/{stem}.png)", "", f"*{FIGURES[stem]}.*", ""]
        else:
            lines += [f"- {FIGURES[stem]}: not drawn (no data for it in results.csv).", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Regenerate ``RUN_DIR/report.md`` and ``RUN_DIR/figures/*.png`` from ``RUN_DIR/results.csv``.

    Failed runs and runs without a finite gain are excluded from every statistic and listed; a
    single batch size, a single seed (sd shown as ``—``, no error bars) and missing optional
    columns (tokens, footprint, entropy, pass@k) are handled, and a figure without data is left
    out with a note. Figures of :data:`FIGURES` left from an earlier report are deleted first,
    so none is stale. Returns the path of ``report.md``. Raises what :func:`load_results`
    raises for a missing, empty or malformed results file.
    """
    run_dir = Path(run_dir)
    rows = load_results(run_dir / "results.csv")
    summaries = summarize(rows)
    columns = _variant_columns(summaries)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for stem in FIGURES:
        (fig_dir / f"{stem}.png").unlink(missing_ok=True)
    drawn = _draw_figures(rows, summaries, columns, fig_dir)
    path = run_dir / "report.md"
    path.write_text(_markdown(run_dir, rows, summaries, columns, drawn))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lora_engine.studies.report RUN_DIR [RUN_DIR ...]``: write each run folder's report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m lora_engine.studies.report RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    for run_dir in argv:
        print(write_report(run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
