"""Smoke test of bench/bench_scaling.py at toy size: every metric lands in the CSV (the count run
in its own process, as the real run), and the figure draws from it."""
from __future__ import annotations

import csv
import importlib
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def scaling(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BENCH_QUICK", "1")
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("bench_scaling", None)
    return importlib.import_module("bench_scaling")


def test_bench_scaling_runs_and_plots(scaling, tmp_path):
    pytest.importorskip("matplotlib")
    csv_path = tmp_path / "r.csv"
    rows = scaling.main(["--model", "random", "--adapters", "3", "--steps", "1", "--prompts", "1", "--samples", "2",
                         "--new-tokens", "3", "--prompt-len", "4", "--micro-batch", "4", "--device", "cpu",
                         "--output-dir", str(tmp_path / "run"), "--csv", str(csv_path)])
    got = {(r["shape"].split(",")[0], r["metric"]) for r in rows}
    metrics = {"s_per_step", "adapter_steps_per_s", "tokens_per_s", "host_ms_per_forward", "host_ms_per_decode",
               "max_rss_gib", "build_s"}
    assert got == {("adapters=3", m) for m in metrics}
    with open(csv_path) as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and all(r["op"] == "grpo_scaling" for r in written)
    assert all(math.isfinite(float(r["value"])) and float(r["value"]) > 0 for r in written)
    png = scaling.plot(csv_path, tmp_path / "scaling.png")
    assert png.exists() and png.stat().st_size > 0


def test_layer_clock_leaves_the_layers_as_they_were(scaling):
    from lora_engine import ops
    from lora_engine.engine.layers import MultiLoRALinear

    saved = (MultiLoRALinear.forward, ops.lora_linear)
    with scaling.LayerClock(exclude_kernels=True) as clock:
        assert MultiLoRALinear.forward is not saved[0]
    assert (MultiLoRALinear.forward, ops.lora_linear) == saved and clock.host_ms_per_forward() == 0.0
