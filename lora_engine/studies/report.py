"""A sweep's ``report.md`` and figures, regenerated from ``RUN_DIR/results.csv`` alone.

``write_report(run_dir)`` reads the results, summarises them with :mod:`lora_engine.studies.analysis`
and writes ``RUN_DIR/report.md`` plus PNGs in ``RUN_DIR/figures/`` (linked relatively, so the
folder can be moved or committed as is). Running it again replaces both; nothing else in the
run folder is read or written. From a shell: ``lora-engine report RUN_DIR``.The figures are ``figures.draw_figures``'s (matplotlib needed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


from lora_engine.studies import regimes
from lora_engine.studies.figures import DASH, FIGURES, finite, cell_text, draw_figures, rows_by_variant, variant_columns
from lora_engine.studies.analysis import (
    CONFIG_COLUMNS,
    families,
    load_results,
    pareto_frontier,
    seed_runs_for_budget,
    summarize,
    usable,
)

__all__ = ["FIGURES", "write_report"]

BUDGET_BYTES = 1 << 30  # the budget table: seed-runs per GiB of adapter + optimizer memory


# --- formatting -----------------------------------------------------------------------------------

def _gain(v) -> str:
    return f"{v:+.4f}" if finite(v) else DASH


def _plain(v, digits: int = 4) -> str:
    return f"{v:.{digits}f}" if finite(v) else DASH


def _pct(v, signed: bool = False) -> str:
    return (f"{100 * v:+.1f}%" if signed else f"{100 * v:.1f}%") if finite(v) else DASH


def _per_million(v) -> str:
    # Study A prints efficiency per million tokens (0.0645 gain / 48M tokens = 0.001344).
    return f"{v * 1e6:.6f}" if finite(v) else DASH


def _count(v) -> str:
    if not finite(v):
        return DASH
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.1f}{unit}"
    return f"{v:.0f}"


def _bytes(v) -> str:
    if not finite(v):
        return DASH
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(v) >= scale:
            return f"{v / scale:.1f} {unit}"
    return f"{v:.0f} B"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --- markdown -------------------------------------------------------------------------------------

def _config_table(summaries, shown: Sequence[str]) -> str:
    has_pass = any(finite(s["mean_pass_at_k_final"]) for s in summaries)
    header = [c.replace("_", " ") for c in shown] + [
        "seeds", "failed", "mean gain", "sd", "best", "worst", "mean-best gap", "P(gain<0)",
        "tokens", "gain / 1M tokens", "entropy change", "trainable params", "optimizer", "checkpoint"]
    if has_pass:
        k = next((s["k"] for s in summaries if finite(s["k"])), None)
        name = f"pass@{cell_text(k)}" if k is not None else "pass@k"
        header += [f"{name} base", f"{name} final"]
    out = []
    for s in summaries:
        row = [cell_text(s[c]) for c in shown] + [
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
    for variant, runs in sorted(rows_by_variant(rows, columns).items()):
        for f in families(runs, by):
            out.append([cell_text(f[by])] + ([variant] if columns else []) + [
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
    body = [[cell_text(s[c]) for c in shown] + [str(s["n_seeds"]), _count(s["mean_tokens"]), _gain(s["mean_gain"]),
                                             _pct(s["risk"]), _per_million(s["token_efficiency"])] for s in frontier]
    n = sum(1 for s in summaries if finite(s["mean_tokens"]) and finite(s["mean_gain"]))
    return (f"{len(frontier)} of {n} configurations are not dominated (no other configuration reaches at least "
            "the same mean gain with at most the same tokens, one of them strictly).\n\n" + _table(header, body))


def _budget_section(rows) -> str:
    try:
        budget = seed_runs_for_budget(rows, BUDGET_BYTES)
    except ValueError:
        return "The results have no trainable_params/optimizer_bytes columns, so no footprint is known."
    body = [[cell_text(b["method"] or None), cell_text(b["rank"]), _count(b["trainable_params"]),
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
        return ", ".join(f"{c.replace('_', ' ')} {cell_text(s[c])}" for c in shown)

    best = max(ok, key=lambda s: s["mean_gain"])
    seed = max(ok, key=lambda s: s["best_gain"])
    lines = [f"- Best mean gain: {name(best)}: {_gain(best['mean_gain'])} over {best['n_seeds']} seed(s), "
             f"risk {_pct(best['risk'])}.",
             f"- Best single seed: {name(seed)}: {_gain(seed['best_gain'])} "
             f"(its mean {_gain(seed['mean_gain'])}, gap {_plain(seed['mean_best_gap'])})."]
    eff = [s for s in ok if finite(s["token_efficiency"])]
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
        lines.append("- Same in every run: " + ", ".join(f"{c.replace('_', ' ')} {cell_text(summaries[0][c])}"
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
    columns = variant_columns(summaries)
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for stem in FIGURES:
        (fig_dir / f"{stem}.png").unlink(missing_ok=True)
    drawn = draw_figures(rows, summaries, columns, fig_dir)
    text = _markdown(run_dir, rows, summaries, columns, drawn)
    (fig_dir / f"{regimes.FIGURE}.png").unlink(missing_ok=True)
    if regimes.has_regimes(rows):  # study C: the regime x rank table and the per-regime curves
        text += regimes.regime_section(run_dir, rows)
    path = run_dir / "report.md"
    path.write_text(text)
    return path
