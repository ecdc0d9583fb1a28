"""bench/plot.py draws one figure per op from a benchmark CSV, keeping the latest row per key."""
import csv
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "bench" / "plot.py")
plot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot)


def test_plot_one_png_per_op_latest_row_wins(tmp_path):
    rows = [("lora_fwd", "naive", "T=8", "ms", "2.0"), ("lora_fwd", "naive", "T=8", "ms", "3.0"),
            ("lora_fwd", "triton", "T=8", "ms", "1.0"), ("logprobs", "naive", "T=4", "ms", "nan"),
            ("logprobs", "naive", "T=4", "peak_mib", "5")]
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["op", "provider", "shape", "metric", "value", "device", "torch", "triton", "git_sha", "date"])
        for r in rows:
            w.writerow([*r, "cpu (2 cores)", "2.13", "3.9", "x", "2026-12-01"])
    assert plot.latest_rows(path) == {"lora_fwd": {("naive", "T=8"): 3.0, ("triton", "T=8"): 1.0}}
    written = plot.plot(path, tmp_path / "figs")
    assert [p.name for p in written] == ["lora_fwd.png"] and written[0].stat().st_size > 1000
