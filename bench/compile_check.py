"""Compile every Triton kernel of lora-engine for a GPU, on a machine that has none.

The CPU interpreter runs our kernels' arithmetic but never compiles them, so it cannot see what
only the compiler rejects or slows down: a ``tl.dot`` tile under 16, a dtype the hardware path
does not take, a tile so large that registers spill to local memory. This script drives the
Triton entry points (LoRA forward and backward, the DoRA epilogue, log-probs with entropy
forward and backward, the policy loss for every loss type and importance level) on small CPU
tensors with the launches recorded instead of run, so each kernel is seen with exactly the tile
sizes, warps, stages and argument specialisations (16-byte alignment, divisibility by 16,
stride 1) that the launchers choose for that dtype on a GPU. Each distinct launch is then
compiled with Triton for the target (default sm_90a: H100 and H200), through ptxas to a cubin,
and ptxas's register and spill counts are reported.

    python bench/compile_check.py                  # sm_90a, bf16 fp16 fp32
    python bench/compile_check.py --arch 80 --dtypes bf16

Exit status 1 if any kernel fails to compile. Spills are reported, not failed: they cost
speed, not correctness. Needs Triton with its NVIDIA backend (the Linux wheels ship ptxas);
no GPU, no CUDA driver. Must run without TRITON_INTERPRET (it compiles real kernels).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check compiles real kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel in its module: ``kernel[grid](...)`` records the call."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))
        return launch


@contextlib.contextmanager
def recording(launches: list):
    """Swap each kernel in our own kernel modules for a Recorder for the duration."""
    from lora_engine.kernels.logprobs import triton_logprobs
    from lora_engine.kernels.lora import triton_dora, triton_lora
    from lora_engine.kernels.policy_loss import triton_policy_loss
    with contextlib.ExitStack() as stack:
        for mod in (triton_lora, triton_dora, triton_logprobs, triton_policy_loss):
            for name, obj in list(vars(mod).items()):
                if isinstance(obj, triton.runtime.jit.JITFunction):
                    stack.enter_context(mock.patch.object(mod, name, Recorder(obj, launches)))
        yield


def drive(dtype: torch.dtype) -> None:
    """Call every Triton entry point once, forward and backward, at shapes that select the GPU tiles."""
    from lora_engine.kernels.logprobs import token_logprobs_triton
    from lora_engine.kernels.lora import LoRALayout, lora_column_scale_triton, lora_linear_triton
    from lora_engine.kernels.policy_loss import LOSS_TYPES, policy_loss_triton
    from lora_engine.engine.routing import routing_from_token_ids

    g = torch.Generator().manual_seed(0)
    # LoRA: ranks up to 256 (the widest rank tile), several adapters, a base-only row.
    T, K, N, ranks = 96, 256, 320, (1, 16, 256)
    layout = LoRALayout(ranks, [2.0] * len(ranks))
    ids = torch.tensor([i % 4 - 1 for i in range(T)])
    routing = routing_from_token_ids(ids, len(ranks), "cpu")
    x = torch.randn(T, K, generator=g).to(dtype).requires_grad_()
    w = torch.randn(N, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    la = torch.randn(sum(ranks), K, generator=g).to(dtype).requires_grad_()
    lb = torch.randn(N, sum(ranks), generator=g).to(dtype).requires_grad_()
    y = lora_linear_triton(x, w, bias, la, lb, layout, routing)
    scale = torch.ones(len(ranks), N, dtype=dtype, requires_grad=True)
    out = lora_column_scale_triton(y, bias, scale, (True, False, True), routing)
    out.backward(torch.ones_like(out))
    # One adapter with more rows than a token chunk (1024; 2048 at rank 256): the split dA/dB/dg
    # reductions, with rank tiles of 16 (rank 16 alone) and 64 (rank 256 beside the others).
    for adapter, lay, A_all, B_all in ((0, LoRALayout((16,), [2.0]), la[:16], lb[:, :16]), (2, layout, la, lb)):
        long_routing = routing_from_token_ids(torch.full((2100,), adapter), lay.num_adapters, "cpu")
        x1 = torch.randn(2100, K, generator=g).to(dtype).requires_grad_()
        y1 = lora_linear_triton(x1, w, bias, A_all.detach().requires_grad_(), B_all.detach().requires_grad_(),
                                lay, long_routing)
        flags = tuple(a == adapter for a in range(lay.num_adapters))
        out = lora_column_scale_triton(y1, bias, scale[:lay.num_adapters].detach().requires_grad_(), flags,
                                       long_routing)
        out.backward(torch.ones_like(out))

    # Log-probs (+ entropy), forward and backward; V not a multiple of any tile.
    h = torch.randn(64, 128, generator=g).to(dtype).requires_grad_()
    head = torch.randn(1000, 128, generator=g).to(dtype)
    tgt = torch.randint(0, 1000, (64,), generator=g)
    lp, ent = token_logprobs_triton(h, head, tgt, temperature=0.7, return_entropy=True)
    (lp.sum() + ent.sum()).backward()

    # Policy loss: fp32 log-probs whatever the model dtype; every loss type and both levels.
    B, L, A = 8, 300, 3
    logp = torch.randn(B, L, generator=g).requires_grad_()
    old, ref = torch.randn(B, L, generator=g), torch.randn(B, L, generator=g)
    adv, mask = torch.randn(B, generator=g), (torch.rand(B, L, generator=g) > 0.2).float()
    aids = torch.arange(B) % A
    for loss_type in LOSS_TYPES:
        for level in ("token", "sequence"):
            for beta, delta, kl_correction in ((0.0, None, False), (0.04, 2.0, False), (0.04, 2.0, True)):
                losses, _ = policy_loss_triton(logp, old, adv, mask, aids, ref_logp=ref, loss_type=loss_type,
                                               beta=beta, delta=delta, importance_level=level,
                                               num_adapters=A, max_completion_length=L,
                                               kl_correction=kl_correction)
                losses.sum().backward()


def compile_launch(kernel, args, kwargs, target):
    """Compile one recorded launch as ``JITFunction.run`` would on that target (its binder and
    specialisation), without a driver. Returns the CompiledKernel."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def ptxas_usage(ptx: str, arch: str) -> tuple[int, int]:
    """(registers per thread, spill bytes stores+loads) from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path
    except TypeError:  # older Tritons: get_ptxas() takes no arch
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = max((int(m) for m in re.findall(r"Used (\d+) registers", log)), default=-1)
    spill = sum(int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log))
    return regs, spill


def describe(kernel, args, kwargs) -> str:
    consts = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
    dt = next((str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)
               and a.is_floating_point()), "-")
    return f"{kernel.fn.__name__}[{dt}] " + " ".join(f"{k}={v}" for k, v in sorted(consts.items()))


def main(argv=None) -> int:
    from triton.backends.compiler import GPUTarget
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90a", help="sm_ number: 90a (H100/H200, default), 90, 80, ...")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    args = p.parse_args(argv)
    cc = int(re.sub(r"\D", "", args.arch))
    target = GPUTarget("cuda", cc, 32)
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}")

    launches: list = []
    for name in args.dtypes.split(","):
        with recording(launches):
            drive(DTYPES[name])
    seen, failed = {}, 0
    for kernel, a, kw in launches:
        key = describe(kernel, a, kw)
        if key in seen:
            continue
        t0 = time.perf_counter()
        try:
            ck = compile_launch(kernel, a, kw, target)
            regs, spill = ptxas_usage(ck.asm["ptx"], args.arch)
            seen[key] = (regs, spill)
            print(f"ok    {time.perf_counter() - t0:5.1f}s  regs {regs:3d}  spill {spill:5d} B  {key}")
        except Exception as e:  # report every failing kernel, then exit 1
            failed += 1
            seen[key] = None
            msg = str(e).strip().splitlines()
            print(f"FAIL  {key}: {type(e).__name__}: {msg[-1] if msg else ''}")
    spilling = [k for k, v in seen.items() if v and v[1] > 0]
    print(f"{len(seen)} distinct launches compiled for sm_{args.arch}: {len(seen) - failed} ok, {failed} failed, "
          f"{len(spilling)} spill registers")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
