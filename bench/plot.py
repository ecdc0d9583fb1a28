"""Figures from the benchmark CSV: one PNG per op, time per provider across shapes.

    python bench/plot.py [--csv bench/results.csv] [--out bench/figures] [--device cpu]

Each op's figure shows the metric ``ms`` (median time) of every provider at every shape the
CSV holds for it, latest row per (op, provider, shape, device) winning, on a log scale: the
growth with the work is what to look at, not one point.
"""
from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def latest_rows(csv_path: Path, metric: str = "ms", device: str | None = None) -> dict:
    """{op: {(provider, shape): value}} of the last row per key with ``metric`` (and ``device`` substring)."""
    out: dict = defaultdict(dict)
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["metric"] != metric or (device and device not in row["device"]):
                continue
            try:
                value = float(row["value"])
            except ValueError:
                continue
            if math.isfinite(value):
                out[row["op"]][(row["provider"], row["shape"])] = value
    return out


def plot(csv_path: Path, out_dir: Path, metric: str = "ms", device: str | None = None) -> list[Path]:
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for op, cells in sorted(latest_rows(csv_path, metric, device).items()):
        providers = sorted({p for p, _ in cells})
        shapes = sorted({s for _, s in cells})
        fig = Figure(figsize=(1.6 + 1.3 * len(shapes) * max(1, len(providers)) / 2, 4.2), layout="constrained")
        ax = fig.subplots()
        width = 0.8 / max(1, len(providers))
        for j, p in enumerate(providers):
            xs = [i + (j - (len(providers) - 1) / 2) * width for i, s in enumerate(shapes) if (p, s) in cells]
            ys = [cells[(p, s)] for s in shapes if (p, s) in cells]
            ax.bar(xs, ys, width=width, label=p)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([s.replace(",", "\n") for s in shapes], fontsize="x-small")
        ax.set_ylabel(metric)
        ax.set_title(f"{op}{f' ({device})' if device else ''}")
        ax.legend(fontsize="small")
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", type=Path, default=HERE / "results.csv")
    ap.add_argument("--out", type=Path, default=HERE / "figures")
    ap.add_argument("--metric", default="ms")
    ap.add_argument("--device", default=None, help="keep rows whose device contains this text (e.g. H200, cpu)")
    args = ap.parse_args(argv)
    if not args.csv.exists():
        raise SystemExit(f"error: {args.csv} does not exist: run a bench script first (bench/bench_lora.py)")
    for path in plot(args.csv, args.out, args.metric, args.device):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
