"""Multi-adapter LoRA linear and the DoRA column-scale epilogue, fp32 PyTorch references: the
spec, and the CPU path.

y = x W^T + b + s_a (x A_a^T) B_a^T for every row of adapter a; rows of adapter -1 get the
base only. One matmul pair per adapter segment; autograd gives every gradient.

Memory is O(T (K + N)) whatever the number of adapters: the routed rows of x are gathered once
(segments are contiguous in routing order), each segment's update lands in one [T_routed, N]
buffer, and that is scattered into y once. (Scattering per segment, ``y.index_add`` per adapter,
copied the whole [T, N] output A times: 6.75 GB for one GRPO step at 32 adapters.)
"""
from __future__ import annotations

import torch

from .layout import LoRALayout, Routing, check_column_scale_inputs, check_lora_inputs


def _pieces(t: torch.Tensor, spans, dim: int) -> list[torch.Tensor]:
    """The ``(offset, size)`` spans (ascending, disjoint) of ``t`` along ``dim`` by one split,
    cutting only around them: O(spans) pieces, not one per adapter slot of the layout."""
    sizes, keep, pos = [], [], 0
    for off, size in spans:
        if off > pos:
            sizes.append(off - pos)
        keep.append(len(sizes))
        sizes.append(size)
        pos = off + size
    if t.shape[dim] > pos:
        sizes.append(t.shape[dim] - pos)
    parts = t.split(sizes, dim)
    return [parts[k] for k in keep]


def lora_linear_naive(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      lora_a: torch.Tensor, lora_b: torch.Tensor, layout: LoRALayout,
                      routing: Routing) -> torch.Tensor:
    """Same contract as ``lora_linear_triton``; computes in fp32 (fp64 if x is fp64), returns x.dtype."""
    check_lora_inputs(x, weight, bias, lora_a, lora_b, layout, routing)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cd) @ weight.to(cd).T
    if bias is not None:
        y = y + bias.to(cd)
    # Split, not sliced per segment: a slice's backward writes a zero tensor of the whole input
    # (all adapters' A, or all routed rows) per segment; one split has one backward for all.
    segs = [(s, a) for s, a in enumerate(routing.seg_adapter) if layout.ranks[a] > 0]
    lengths = [t1 - t0 for t0, t1 in zip(routing.seg_start, routing.seg_start[1:])]
    xs = x.index_select(0, routing.token_idx).to(cd).split(lengths)
    rows_s = routing.token_idx.split(lengths)
    spans = [(layout.offsets[a], layout.ranks[a]) for _, a in segs]
    a_s, b_s = _pieces(lora_a.to(cd), spans, 0), _pieces(lora_b.to(cd), spans, 1)
    deltas = [layout.scales[a] * ((xs[s] @ a_s[j].T) @ b_s[j].T) for j, (s, a) in enumerate(segs)]
    if deltas:
        y = y.index_add(0, torch.cat([rows_s[s] for s, _ in segs]), torch.cat(deltas))
    return y.to(x.dtype)


def lora_column_scale_naive(y: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                            scaled: tuple[bool, ...], routing: Routing) -> torch.Tensor:
    """Same contract as ``lora_column_scale_triton``; computes in fp32 (fp64 if y is fp64), returns y.dtype.

    out[t] = y[t] + (scale[a] - 1) * (y[t] - bias) for the rows t of every adapter a with scaled[a].
    """
    check_column_scale_inputs(y, bias, scale, scaled, routing)
    cd = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = y.to(cd)
    # Flagged segments' rows and adapters, by segment-level index arithmetic (no per-row mask),
    # then one gather of their scale rows and one scatter back.
    segs = [(s, a) for s, a in enumerate(routing.seg_adapter) if scaled[a]]
    if not segs:
        return out.to(y.dtype)
    spans = [(routing.seg_start[s], routing.seg_start[s + 1] - routing.seg_start[s]) for s, _ in segs]
    rows = torch.cat([routing.token_idx[t0:t0 + n] for t0, n in spans])
    tok_adapter = torch.repeat_interleave(torch.tensor([a for _, a in segs], device=rows.device),
                                          torch.tensor([n for _, n in spans], device=rows.device))
    y_a = out.index_select(0, rows)
    base = y_a - bias.to(cd) if bias is not None else y_a
    out = out.index_copy(0, rows, y_a + (scale.index_select(0, tok_adapter).to(cd) - 1) * base)
    return out.to(y.dtype)
