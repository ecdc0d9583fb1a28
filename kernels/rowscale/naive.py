"""Routed row scale, the fp32 PyTorch reference: the spec, and the CPU path.

    out[t] = x[t] * scale[r] + shift[r]    r = slot_row[a], for the rows t of every adapter a with r >= 0
    out[t] = base[t]  (x[t] without base)  for every other row (adapter -1 included)

Each row is scaled by its own adapter's vector: IA3's learned vectors (on a layer's input or
output) and LayerNorm tuning's per-adapter norm weight and bias (``x`` the unit-affine norm
output, ``base`` the base norm's output). One gather of the scaled rows and one scatter back,
by segment-level index arithmetic (no per-row mask); autograd gives every gradient.
"""
from __future__ import annotations

import torch

from .layout import check_row_scale_inputs


def routed_scale_naive(x: torch.Tensor, scale: torch.Tensor, slot_row: torch.Tensor, routing,
                       shift: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``routed_scale_triton``; computes in fp32 (fp64 if x is fp64), returns x.dtype."""
    check_row_scale_inputs(x, scale, slot_row, routing, shift, base)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = (x if base is None else base).to(cd)
    row_of = slot_row.tolist()
    segs = [(s, row_of[a]) for s, a in enumerate(routing.seg_adapter) if row_of[a] >= 0]
    if not segs:
        return out.to(x.dtype)
    spans = [(routing.seg_start[s], routing.seg_start[s + 1] - routing.seg_start[s]) for s, _ in segs]
    rows = torch.cat([routing.token_idx[t0:t0 + n] for t0, n in spans])
    tok_row = torch.repeat_interleave(torch.tensor([r for _, r in segs], device=rows.device),
                                      torch.tensor([n for _, n in spans], device=rows.device))
    val = x.index_select(0, rows).to(cd) * scale.index_select(0, tok_row).to(cd)
    if shift is not None:
        val = val + shift.index_select(0, tok_row).to(cd)
    return out.index_copy(0, rows, val).to(x.dtype)
