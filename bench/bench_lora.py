"""Benchmark the multi-adapter LoRA linear against the frozen base layer and peers.

Providers:
  base         x @ W^T alone (the floor: the LoRA overhead is measured against it)
  naive        base GEMM + one matmul pair per adapter (index_select / index_add), input dtype
  torch_compile  the naive function under torch.compile
  triton       lora_engine's kernels (GPU)
  grouped_mm   torch._grouped_mm with every adapter padded to the largest rank (GPU, bf16, where available)
Modes: fwd; fwd_dx (forward + input gradient, what the frozen base needs for backprop);
fwd_bwd (forward + dx + every dA_a, dB_a).

    python bench/bench_lora.py                 # Qwen3-8B projections on a GPU, a small shape on a CPU
    python bench/bench_lora.py --providers base,naive --modes fwd
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CSV_PATH, append_rows, bench_ms, peak_memory_mb, triton_runs  # noqa: E402

from lora_engine.kernels.lora import LoRALayout  # noqa: E402
from lora_engine.engine.routing import routing_from_token_ids  # noqa: E402

GPU_SHAPES = [(16384, 4096, 4096), (16384, 4096, 12288), (16384, 12288, 4096)]  # Qwen3-8B q/o, up/gate, down
CPU_SHAPES = [(1024, 512, 512), (1024, 512, 1536)]
RANKS16 = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1, 2, 4, 8, 16, 32, 64)  # 16 adapters, the study's rank grid


def make_inputs(T, K, N, ranks, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    A = len(ranks)
    ranks = tuple(min(r, K, N) for r in ranks)
    x = (torch.randn(T, K, generator=g) / 4).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
    la = (torch.randn(sum(ranks), K, generator=g) / K ** 0.5).to(device, dtype)
    lb = (torch.randn(N, sum(ranks), generator=g) / 8).to(device, dtype)
    ids = torch.arange(T) % A  # equal share per adapter, interleaved as rollouts arrive
    layout = LoRALayout(ranks, [32.0 / r for r in ranks])
    routing = routing_from_token_ids(ids, A, device)
    return x, w, la, lb, layout, routing


def naive_lora(x, w, la, lb, layout, routing):
    y = x @ w.T
    for a, rows in routing.segments():
        r, off = layout.ranks[a], layout.offsets[a]
        d = ((x.index_select(0, rows) @ la[off:off + r].T) @ lb[:, off:off + r].T) * layout.scales[a]
        y = y.index_add(0, rows, d)
    return y


def base_only(x, w, la, lb, layout, routing):
    return x @ w.T


def grouped_mm_lora(x, w, la, lb, layout, routing):
    """Padded-to-max-rank grouped GEMMs over the adapter-sorted rows (needs torch._grouped_mm)."""
    R = layout.max_rank
    G = layout.num_adapters
    A_pad = x.new_zeros(G, x.shape[1], R)
    B_pad = x.new_zeros(G, R, w.shape[0])
    for a in range(G):
        r, off = layout.ranks[a], layout.offsets[a]
        A_pad[a, :, :r] = la[off:off + r].T
        B_pad[a, :r, :] = lb[:, off:off + r].T * layout.scales[a]
    counts = torch.tensor([routing.seg_start[s + 1] - routing.seg_start[s] for s in range(routing.num_segments)])
    offs = torch.cumsum(counts, 0).to(x.device, torch.int32)
    xs = x.index_select(0, routing.token_idx)
    u = torch._grouped_mm(xs, A_pad, offs=offs)
    d = torch._grouped_mm(u, B_pad, offs=offs)
    return (x @ w.T).index_add(0, routing.token_idx, d)


def triton_lora(x, w, la, lb, layout, routing):
    from lora_engine.kernels.lora.triton_lora import lora_linear_triton
    return lora_linear_triton(x, w, None, la, lb, layout, routing)


def provider_fn(name):
    if name == "base":
        return base_only
    if name == "naive":
        return naive_lora
    if name == "torch_compile":
        return torch.compile(naive_lora, dynamic=False)
    if name == "triton":
        return triton_lora
    if name == "grouped_mm":
        return grouped_mm_lora
    raise ValueError(f"unknown provider {name!r}")


def available(name, device, dtype) -> bool:
    if name == "triton":
        return triton_runs()
    if name == "grouped_mm":
        return device == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
    return True


def run_case(fn, mode, x, w, la, lb, layout, routing):
    need_w = mode == "fwd_bwd"
    x = x.detach().requires_grad_(mode != "fwd")
    la = la.detach().requires_grad_(need_w)
    lb = lb.detach().requires_grad_(need_w)
    dy = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(x, w, la, lb, layout, routing)
        y = fn(x, w, la, lb, layout, routing)
        y.backward(dy)
        x.grad = la.grad = lb.grad = None
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--providers", default="base,naive,torch_compile,triton,grouped_mm")
    p.add_argument("--modes", default="fwd,fwd_dx,fwd_bwd")
    p.add_argument("--dtype", default=None, help="bf16 on a GPU, fp32 on a CPU by default")
    p.add_argument("--shapes", default=None, help="TxKxN,... (default: Qwen3-8B projections on a GPU)")
    p.add_argument("--csv", type=Path, default=CSV_PATH)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device == "cuda" else "fp32")]
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for (T, K, N) in shapes:
        inputs = make_inputs(T, K, N, RANKS16, dtype, device)
        shape = f"T={T},K={K},N={N},A=16,ranks=1..256"
        for mode in args.modes.split(","):
            base_ms = None
            for prov in args.providers.split(","):
                if not available(prov, device, dtype):
                    continue
                try:
                    step = run_case(provider_fn(prov), mode, *inputs)
                    ms = bench_ms(step)
                    mem = peak_memory_mb(step)
                except Exception as e:  # a peer that fails on this build is reported, not fatal
                    print(f"{prov:14s} {mode:8s} {shape}: failed ({type(e).__name__}: {e})")
                    continue
                if prov == "base":
                    base_ms = ms
                over = (ms / base_ms - 1) * 100 if base_ms else float("nan")
                print(f"{prov:14s} {mode:8s} {shape}: {ms:9.3f} ms  peak {mem:8.1f} MiB  overhead vs base {over:6.1f}%")
                for metric, value in (("ms", ms), ("peak_mib", mem), ("overhead_pct", over)):
                    rows.append({"op": f"lora_{mode}", "provider": prov, "shape": shape,
                                 "metric": metric, "value": f"{value:.4f}"})
    if not args.no_csv:
        append_rows(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
