"""Smoke tests of the benchmark scripts: every provider that this machine has runs, the rows land
in the CSV, and the Triton providers agree with the naive ones where outputs are compared.

These measure nothing (one call each, the Triton kernels in the CPU interpreter at tiny
shapes); they keep the GPU session's scripts from failing on a typo.
"""
from __future__ import annotations

import csv
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BENCH_QUICK", "1")
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name):
        sys.modules.pop(name, None)
        return importlib.import_module(name)
    return load


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_bench_lora_runs_every_cpu_provider(bench, tmp_path):
    mod = bench("bench_lora")
    csv_path = tmp_path / "r.csv"
    rows = mod.main(["--shapes", "40x24x20", "--providers", "base,naive,triton",
                     "--csv", str(csv_path)])
    got = {(r["provider"], r["op"]) for r in rows}
    want = {(p, f"lora_{m}") for p in ("base", "naive", "triton") for m in ("fwd", "fwd_dx", "fwd_bwd")}
    assert got == want
    written = _rows(csv_path)
    assert len(written) == len(rows)
    assert all(r["device"].startswith("cpu") for r in written)
    assert all(math.isfinite(float(r["value"])) for r in written if r["metric"] == "ms")


def test_bench_lora_providers_compute_the_same_layer(bench):
    mod = bench("bench_lora")
    inputs = mod.make_inputs(40, 24, 20, mod.RANKS16, torch.float32, "cpu")
    ref = mod.naive_lora(*inputs)
    torch.testing.assert_close(mod.triton_lora(*inputs), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mod.base_only(*inputs), ref)  # the adapters do change the output


def test_bench_logprobs_runs(bench, tmp_path):
    mod = bench("bench_logprobs")
    rows = mod.main(["--T", "17", "--d", "16", "--V", "70", "--providers", "naive,triton",
                     "--csv", str(tmp_path / "r.csv")])
    providers = {r["provider"] for r in rows}
    assert providers == {"matmul_floor", "naive", "triton"}
    assert {r["metric"] for r in rows if r["provider"] == "triton"} == {
        "fwd_ms", "fwd_bwd_ms", "peak_mb", "tflops", "x_floor"}


def test_bench_policy_loss_runs(bench, tmp_path):
    mod = bench("bench_policy_loss")
    rows = mod.main(["--B", "6", "--L", "9", "--A", "3", "--providers", "naive,triton",
                     "--csv", str(tmp_path / "r.csv")])
    assert {r["provider"] for r in rows} == {"naive", "triton"}


def test_bench_trainer_runs(bench, tmp_path):
    mod = bench("bench_trainer")
    rows = mod.main(["--adapters", "1,3", "--steps", "1", "--prompts", "1", "--samples", "2",
                     "--prompt-len", "4", "--new-tokens", "3", "--rank", "2",
                     "--output-dir", str(tmp_path / "run"), "--csv", str(tmp_path / "r.csv")])
    tok = {r["shape"].split(",")[0]: float(r["value"]) for r in rows if r["metric"] == "tokens_per_s"}
    assert set(tok) == {"adapters=1", "adapters=3"}
    assert all(v > 0 for v in tok.values())


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm not in this torch")
def test_bench_grouped_mm_peer_computes_the_same_layer(bench):
    """The padded grouped-GEMM peer is a fair comparison only if it computes the same layer:
    in bf16 its error against an fp32 run is at most twice the naive bf16 loop's."""
    mod = bench("bench_lora")
    inputs = mod.make_inputs(40, 32, 24, mod.RANKS16, torch.bfloat16, "cpu")
    as32 = [t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
    ref = mod.naive_lora(*as32)
    try:
        got = mod.grouped_mm_lora(*inputs).float()
    except RuntimeError as e:  # a CPU build without the bf16 grouped kernel
        pytest.skip(f"torch._grouped_mm unavailable on this CPU build: {e}")
    naive_err = (mod.naive_lora(*inputs).float() - ref).abs().max()
    assert (got - ref).abs().max() <= 2 * naive_err + 1e-6
