"""Shared benchmark plumbing: timing, peak memory, environment facts, CSV rows.

Every bench script appends rows (op, provider, shape, metric, value, device, torch, triton,
git sha, date) to ``bench/results.csv``; ``bench/plot.py`` draws figures from that file.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

CSV_PATH = Path(__file__).with_name("results.csv")
FIELDS = ["op", "provider", "shape", "metric", "value", "device", "torch", "triton", "git_sha", "date"]


def env_info() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({os.cpu_count()} cores)"
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                      stderr=subprocess.DEVNULL).strip()
    except Exception:
        sha = "unknown"
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "git_sha": sha, "date": _dt.date.today().isoformat()}


def triton_runs() -> bool:
    """Triton providers run on a GPU, or under the CPU interpreter (a smoke check, not a benchmark)."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def bench_ms(fn, warmup: int = 3, rep: int = 10) -> float:
    """Median milliseconds of ``fn()``: triton.testing.do_bench on a GPU, wall clock on a CPU.

    ``LORA_ENGINE_BENCH_QUICK=1`` calls ``fn`` once (the smoke tests: does every provider run?).
    ``LORA_ENGINE_BENCH_REP_MS`` sets do_bench's measuring time on a GPU (default 100 ms, warm-up
    a quarter of it); ``bench/gpu_session.sh`` uses 20 to fit its 8-minute budget.
    """
    if os.environ.get("LORA_ENGINE_BENCH_QUICK") == "1":
        warmup, rep = 0, 1
    elif torch.cuda.is_available():
        import triton.testing
        rep_ms = float(os.environ.get("LORA_ENGINE_BENCH_REP_MS", "100"))
        return float(triton.testing.do_bench(fn, warmup=rep_ms / 4, rep=rep_ms, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn) -> float:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before (MiB); nan on CPU."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def append_rows(rows: list[dict], path: Path = CSV_PATH) -> None:
    info = env_info()
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**info, **r})
