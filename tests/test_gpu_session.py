"""The one-call GPU session script runs end to end at toy shapes (on a CPU: Triton kernels in the
interpreter), so that its first GPU call is not its first run. It measures nothing here; it
checks that every stage runs, logs its status and appends its CSV rows."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["tests_bf16", "tests_other", "lora", "logprobs", "grpo_1_adapters", "grpo_3_adapters"]


@pytest.mark.slow
def test_gpu_session_script_runs_every_stage_at_toy_shapes(tmp_path):
    out = tmp_path / "session"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("LORA_ENGINE_BENCH_QUICK", None)  # the script sets what toy mode needs itself
    res = subprocess.run(["bash", "bench/gpu_session.sh", "--toy", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    log = (out / "session.log").read_text()
    assert res.returncode == 0, log + res.stdout[-2000:] + res.stderr[-2000:]
    for name in STAGES:
        assert f"ok    {name} (" in log, f"stage {name} did not pass:\n{log}"
        assert (out / f"{name}.log").stat().st_size > 0
    assert "mode: toy" in log and "versions: torch" in log and (out / "env.txt").exists()

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    got = {(r["op"], r["provider"]) for r in rows}
    for mode in ("fwd", "fwd_dx", "fwd_bwd"):
        assert {(f"lora_{mode}", "base"), (f"lora_{mode}", "triton")} <= got
    assert {("logprobs", "matmul_floor"), ("logprobs", "triton"), ("grpo_step", "lora_engine")} <= got
    adapters = {r["shape"].split(",")[0] for r in rows if r["op"] == "grpo_step"}
    assert adapters == {"adapters=1", "adapters=3"}
    timings = [float(r["value"]) for r in rows if r["metric"] in ("ms", "fwd_bwd_ms", "tokens_per_s")]
    assert timings and all(math.isfinite(v) and v > 0 for v in timings)


def test_gpu_session_script_refuses_a_cpu_without_toy(tmp_path):
    if _has_cuda():
        pytest.skip("this machine has a GPU: the full session would run")
    res = subprocess.run(["bash", "bench/gpu_session.sh", str(tmp_path / "s")], cwd=ROOT,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--toy" in res.stdout


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()
