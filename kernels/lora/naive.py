"""Multi-adapter LoRA linear and the DoRA column-scale epilogue, fp32 PyTorch references: the
spec, and the CPU path.

y = x W^T + b + s_a (x A_a^T) B_a^T for every row of adapter a; rows of adapter -1 get the
base only. One matmul pair per adapter segment; autograd gives every gradient.
"""
from __future__ import annotations

import torch

from .layout import LoRALayout, Routing, check_column_scale_inputs, check_lora_inputs


def lora_linear_naive(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, layout: LoRALayout,
                      routing: Routing) -> torch.Tensor:
    """Same contract as ``lora_linear_triton``; computes in fp32 (fp64 if x is fp64), returns x.dtype."""
    check_lora_inputs(x, weight, bias, lora_a, lora_b, layout, routing)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cd) @ weight.to(cd).T
    if bias is not None:
        y = y + bias.to(cd)
    for a, rows in routing.segments():
        r, off = layout.ranks[a], layout.offsets[a]
        if r == 0:
            continue
        A = lora_a[off:off + r].to(cd)
        B = lora_b[:, off:off + r].to(cd)
        delta = layout.scales[a] * ((x[rows].to(cd) @ A.T) @ B.T)
        y = y.index_add(0, rows, delta)
    return y.to(x.dtype)


def lora_column_scale_naive(y: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                            scaled: tuple[bool, ...], routing: Routing) -> torch.Tensor:
    """Same contract as ``lora_column_scale_triton``; computes in fp32 (fp64 if y is fp64), returns y.dtype.

    out[t] = y[t] + (scale[a] - 1) * (y[t] - bias) for the rows t of every adapter a with scaled[a].
    """
    check_column_scale_inputs(y, bias, scale, scaled, routing)
    cd = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = y.to(cd)
    b = bias.to(cd) if bias is not None else None
    for a, rows in routing.segments():
        if not scaled[a]:
            continue
        y_a = out[rows]
        base = y_a - b if b is not None else y_a
        out = out.index_copy(0, rows, y_a + (scale[a].to(cd) - 1) * base)
    return out.to(y.dtype)
