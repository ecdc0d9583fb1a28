"""The sweep report's figures, drawn from ``analysis`` summaries on ``matplotlib.figure.Figure``
objects directly, never through pyplot, so the caller's backend and global state are untouched
and nothing needs a display (``pip install matplotlib``).

Figures split by *variant* only when needed: a configuration column other than rank and batch
size (method, lr, alpha, ...) becomes part of a figure's series label when two configurations
with the same rank and batch size differ in it. A column that is a function of rank and batch
(a rank-matched lr, prompts_per_step growing with batch) would otherwise split every line into
one-point series.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from lora_engine.studies.analysis import CONFIG_COLUMNS, config_key, families, pareto_frontier, sort_key

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
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", ":", "-.")
DASH = "—"


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def cell_text(v) -> str:
    """A configuration value in a table cell or label (``|`` would end a markdown cell)."""
    if v is None:
        return DASH
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace("|", "\\|")


# --- variants -------------------------------------------------------------------------------------

def variant_columns(summaries: Sequence[dict]) -> list[str]:
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


def variant_label(s: dict, columns: Sequence[str]) -> str:
    return " ".join(f"{c}={cell_text(s.get(c))}" for c in columns)


def rank_ok(s: dict) -> bool:
    return finite(s.get("rank")) and s["rank"] > 0


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
        if rank_ok(s) and s["n_seeds"] > 0:
            out[(variant_label(s, columns), s["batch_size"])].append(s)
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
    return f"batch {cell_text(batch)}" + (f", {variant}" if variant else "")


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
        sd = np.array([s["sd_gain"] if finite(s["sd_gain"]) else 0.0 for s in ss])
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
            by_variant[variant_label(s, columns)].append(s)
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
        ax.set_xticks(range(len(batches)), [cell_text(b) for b in batches])
        ax.set_yticks(range(len(ranks)), [cell_text(r) for r in ranks])
        ax.set_xlabel("batch size (sequences per step)")
        ax.set_ylabel("LoRA rank")
        ax.set_title(f"P(gain < 0){' ' + variant if variant else ''}", fontsize="medium")
    fig.colorbar(image, ax=list(axes), label="negative-gain risk", shrink=0.9)
    fig.savefig(path, dpi=120)
    return True


def _plot_efficiency(summaries, rows, columns, path: Path) -> bool:
    series = {k: [s for s in ss if finite(s["token_efficiency"])] for k, ss in _series(summaries, columns).items()}
    series = {k: ss for k, ss in series.items() if ss}
    if not series:
        return False
    fig, (ax,) = _figure()
    style = _style(list(series))
    for key, ss in series.items():
        ax.plot([s["rank"] for s in ss], [1e6 * s["token_efficiency"] for s in ss], label=_label(key), **style(key))
    for i, (variant, runs) in enumerate(sorted(rows_by_variant(rows, columns).items())):
        fam = [f for f in families(runs, "rank") if finite(f["token_efficiency"]) and finite(f["rank"]) and f["rank"] > 0]
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
    points = [s for s in summaries if finite(s["mean_tokens"]) and finite(s["mean_gain"])]
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
        text = f"r{cell_text(s['rank'])} b{cell_text(s['batch_size'])}"
        variant = variant_label(s, columns)
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


def rows_by_variant(rows, columns) -> dict[str, list[dict]]:
    """Runs grouped by the variant label of their configuration (as :func:`variant_label` names it)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        out[variant_label(dict(zip(CONFIG_COLUMNS, config_key(r))), columns)].append(r)
    return dict(out)


def _plot_mean_vs_best(rows, columns, path: Path) -> bool:
    groups = {}
    for variant, runs in sorted(rows_by_variant(rows, columns).items()):
        fam = [f for f in families(runs, "rank") if f["n_seeds"] > 0 and finite(f["rank"]) and f["rank"] > 0]
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
        variant = variant_label(s, columns)
        labels.append(f"r{cell_text(s['rank'])}\nb{cell_text(s['batch_size'])}" + (f"\n{variant}" if variant else ""))
    ax.set_xticks(positions, labels, fontsize=7)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_ylabel("gain per seed")
    ax.set_title("Gain distribution per configuration (box: quartiles; dots: seeds)")
    fig.savefig(path, dpi=120)
    return True


def _plot_footprint(summaries, path: Path) -> bool:
    by_method: dict[str, dict] = defaultdict(dict)
    for s in summaries:
        if rank_ok(s):
            slot = by_method[cell_text(s["method"]) if s["method"] is not None else ""].setdefault(s["rank"], {})
            for column in ("trainable_params", "optimizer_bytes", "checkpoint_bytes"):
                if finite(s[column]):
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


def draw_figures(rows, summaries, columns, fig_dir: Path) -> list[str]:
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
