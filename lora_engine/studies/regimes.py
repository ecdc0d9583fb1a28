"""Study C's part of a sweep report: the reward regime x rank table and the per-regime curves.

Read from ``results.csv`` rows (``reward_regime``, ``rank``, ``method``, ``gain``, ``final_score``)
and ``curves.csv`` (one row per run per step, ``results.write_curves``). A run of
``method = "full"`` sits in the "full" column whatever its nominal rank. Per cell: mean gain over
the usable seeds, its sample sd and the seed count; per regime over steps: the mean over its
runs of the advantage std, the response length and the fraction truncated (study C's collapse
signature: the advantage std spikes, then length saturates and truncation goes to 1).
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from lora_engine.studies.analysis import usable

ORDER = ("outcome", "process", "distillation")
FIGURE = "regime_curves"
CAPTION = "Per reward regime, mean over its runs: advantage std, response length, fraction truncated"
CURVES = (("adv_std", "advantage std"), ("response_len", "response length (tokens)"),
          ("truncated_frac", "fraction truncated"))


def _order(regime: str) -> tuple:
    return (ORDER.index(regime) if regime in ORDER else len(ORDER), regime)


def has_regimes(rows) -> bool:
    """Whether the sweep compares reward regimes (any run not on the outcome reward)."""
    return any((r.get("reward_regime") or "outcome") != "outcome" for r in rows)


def _column(row) -> str:
    return "full" if row.get("method") == "full" else str(int(row["rank"]))


def _mean_sd(xs) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan


def _cell(xs, signed: bool, digits: int = 3) -> str:
    m, sd = _mean_sd(xs)
    if not xs:
        return "—"
    spread = f" ± {sd:.{digits}f}" if math.isfinite(sd) else ""
    return f"{m:{'+' if signed else ''}.{digits}f}{spread} ({len(xs)})"


def regime_table(rows, value: str = "gain") -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per regime, one column per rank (then "full"), cells mean ± sd (n)."""
    ok = [r for r in rows if usable(r)]
    cols = sorted({_column(r) for r in ok}, key=lambda c: (c == "full", int(c) if c != "full" else 0))
    cells = defaultdict(list)
    for r in ok:
        cells[(r.get("reward_regime") or "outcome", _column(r))].append(float(r[value]))
    body = [[g] + [_cell(cells[(g, c)], signed=value == "gain") for c in cols]
            for g in sorted({k[0] for k in cells}, key=_order)]
    return ["regime"] + [f"rank {c}" if c != "full" else "full FT" for c in cols], body


def load_curves(run_dir, rows) -> dict[str, dict[str, dict[int, float]]]:
    """{regime: {metric: {step: mean over the regime's usable runs}}} from ``curves.csv`` ({} if absent)."""
    path = Path(run_dir) / "curves.csv"
    if not path.exists():
        return {}
    regime = {r["run_id"]: r.get("reward_regime") or "outcome" for r in rows if usable(r)}
    acc = defaultdict(list)
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            if rec["run_id"] not in regime:
                continue
            for key, _ in CURVES:
                v = float(rec[key]) if rec.get(key) not in (None, "") else math.nan
                if math.isfinite(v):
                    acc[(regime[rec["run_id"]], key, int(rec["step"]))].append(v)
    out: dict = defaultdict(lambda: defaultdict(dict))
    for (g, key, step), vs in acc.items():
        out[g][key][step] = sum(vs) / len(vs)
    return {g: {k: dict(sorted(v.items())) for k, v in out[g].items()} for g in sorted(out, key=_order)}


def _draw(curves, path: Path) -> bool:
    from matplotlib.figure import Figure
    if not curves:
        return False
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, len(CURVES))
    for ax, (key, label) in zip(axes, CURVES):
        for g, d in curves.items():
            if d.get(key):
                ax.plot(list(d[key]), list(d[key].values()), marker=".", label=g)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path, dpi=110)
    return True


def _md(header, body) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in body])


def regime_section(run_dir, rows) -> str:
    """Markdown of study C's tables and figure (drawn into ``run_dir/figures``)."""
    run_dir = Path(run_dir)
    curves = load_curves(run_dir, rows)
    lines = ["", "## Reward regime x rank (study C)", "",
             "Mean held-out gain ± sample sd over seeds (seed count); full FT: `method = \"full\"`.", "",
             _md(*regime_table(rows, "gain")), "", "Final held-out greedy pass@1, same cells:", "",
             _md(*regime_table(rows, "final_score")), ""]
    if curves:
        head = ["regime", "peak advantage std", "at step", "first-step advantage std", "final response length",
                "final truncated"]
        body = []
        for g, d in curves.items():
            a = d.get("adv_std", {})
            peak = max(a, key=a.get) if a else None
            last = lambda k: list(d[k].values())[-1] if d.get(k) else math.nan  # noqa: E731
            body.append([g, f"{a[peak]:.3f}" if a else "—", str(peak) if a else "—",
                         f"{next(iter(a.values())):.3f}" if a else "—", f"{last('response_len'):.2f}",
                         f"{last('truncated_frac'):.3f}"])
        lines += ["Diagnostics per regime (mean over its runs, per step):", "", _md(head, body), ""]
        (run_dir / "figures").mkdir(exist_ok=True)
        if _draw(curves, run_dir / "figures" / f"{FIGURE}.png"):
            lines += [f"![{CAPTION}](figures/{FIGURE}.png)", "", f"*{CAPTION}.*", ""]
    else:
        lines += ["No curves.csv beside results.csv: the per-step curves are not shown.", ""]
    return "\n".join(lines)
