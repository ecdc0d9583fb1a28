"""Benchmark: per-token log-probs from hidden states, forward and forward + backward (dh).

Providers:
  naive          what a PyTorch trainer does (TRL, HF): full logits ``h @ W^T`` in the input dtype,
                 ``.float()``, log_softmax, gather. Holds several [T, V] fp32 tensors.
  torch_compile  the same function under ``torch.compile``.
  triton         ``token_logprobs_triton`` (GPU only: the CPU interpreter is not a benchmark).
  liger          ``LigerFusedLinearCrossEntropyLoss(reduction="sum")`` on ``h / temperature``, where
                 ``liger_kernel`` imports (GPU only); same GEMM work, a summed loss instead of
                 per-token log-probs.

Metrics per provider: fwd_ms, fwd_bwd_ms, peak_mb (fwd + bwd, CUDA only), tflops and x_floor.
Useful work of a fused forward + backward is 3 GEMMs (logits forward, logits recompute in the
backward, dh = dz @ W) of 2*T*d*V FLOPs each: ``flops = 3 * 2 * T * d * V``. ``x_floor`` is
fwd_bwd_ms over the measured time of 3 plain ``torch.mm(h, W.t())`` of the same shape and dtype
(the matmul floor on this device), so 1.0 would be a fused path with zero overhead.

    python bench/bench_logprobs.py                    # GPU: T=16384 d=4096 V=151936 bf16
    python bench/bench_logprobs.py --csv /tmp/r.csv   # CPU: T=256 d=256 V=4096 fp32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CSV_PATH, append_rows, bench_ms, peak_memory_mb, triton_runs  # noqa: E402

from lora_engine.kernels.logprobs import token_logprobs_triton  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def naive_logprobs(h, w, y, temperature: float):
    logits = (h @ w.t()).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)


def providers(cuda: bool) -> dict:
    out = {"naive": naive_logprobs, "torch_compile": torch.compile(naive_logprobs)}
    if triton_runs():
        out["triton"] = lambda h, w, y, t: token_logprobs_triton(h, w, y, temperature=t)
    if cuda:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
            liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
            out["liger"] = lambda h, w, y, t: -liger(w, h / t, y)
        except Exception as e:  # not installed, or an API change: report and go on
            print(f"liger skipped: {type(e).__name__}: {e}")
    return out


def main(argv=None) -> list:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=16384 if cuda else 256)
    p.add_argument("--d", type=int, default=4096 if cuda else 256)
    p.add_argument("--V", type=int, default=151936 if cuda else 4096)
    p.add_argument("--dtype", choices=DTYPES, default="bf16" if cuda else "fp32")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--providers", default="", help="comma list; default: all available")
    p.add_argument("--csv", type=Path, default=CSV_PATH)
    args = p.parse_args(argv)

    T, d, V, dtype = args.T, args.d, args.V, DTYPES[args.dtype]
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(T, d, device=dev, dtype=dtype, generator=g)
    w = torch.randn(V, d, device=dev, dtype=dtype, generator=g) / d ** 0.5
    y = torch.randint(0, V, (T,), device=dev, generator=g)
    grad = torch.randn(T, device=dev, generator=g)
    shape = f"T={T},d={d},V={V},{args.dtype}"

    flops = 3 * 2 * T * d * V
    floor_ms = 3 * bench_ms(lambda: torch.mm(h, w.t()))
    rows = [dict(op="logprobs", provider="matmul_floor", shape=shape, metric="fwd_bwd_ms", value=floor_ms)]
    print(f"{shape}: matmul floor (3 GEMMs) {floor_ms:.2f} ms")

    wanted = [s for s in args.providers.split(",") if s]
    for name, fn in providers(cuda).items():
        if wanted and name not in wanted:
            continue
        x = h.detach().requires_grad_()

        def fwd():
            return fn(x, w, y, args.temperature)

        def fwd_bwd():
            out = fn(x, w, y, args.temperature)
            out.backward() if out.dim() == 0 else out.backward(grad)
            x.grad = None

        fwd_ms = bench_ms(fwd)
        fb_ms = bench_ms(fwd_bwd)
        peak = peak_memory_mb(fwd_bwd)
        metrics = dict(fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms, peak_mb=peak,
                       tflops=flops / (fb_ms * 1e-3) / 1e12, x_floor=fb_ms / floor_ms)
        print(f"  {name:14s} fwd {fwd_ms:9.2f} ms  fwd+bwd {fb_ms:9.2f} ms  peak {peak:9.1f} MiB  "
              f"{metrics['tflops']:7.2f} TFLOP/s  {metrics['x_floor']:6.2f}x floor")
        rows += [dict(op="logprobs", provider=name, shape=shape, metric=k, value=v)
                 for k, v in metrics.items()]
    append_rows(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
