"""Routed row scale in Triton: each row scaled (and shifted) by its own adapter's vector.

    out[t] = x[t] * scale[r] + shift[r]    r = slot_row[a] >= 0, for the rows t of adapter a
    out[t] = base[t]  (x[t] without base)  for every other row

Forward: ``out`` starts as a copy of base (or x), then one program per (row tile of a segment,
column tile) overwrites the scaled adapters' rows; tiles of other adapters return at once.

Backward: dx = dout * scale[r] on the scaled rows (dout elsewhere without base, 0 with it);
dbase = dout with the scaled rows zeroed; dscale[r] = sum_{t in a} dout[t] * x[t] and
dshift[r] = sum_{t in a} dout[t], one program per (token chunk, column tile) reducing its rows
in order, then one per (split segment, column tile) summing its chunks' fp32 partials in
order: deterministic, no atomics (chunks as DoRA's dg, ``layout.token_chunk_rows(1)``).
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch
import triton
import triton.language as tl

from lora_engine.kernels.lora.layout import Routing, token_chunk_rows

from .layout import check_row_scale_inputs


# --- kernels ------------------------------------------------------------------------------

@triton.jit
def _rowscale_kernel(
    src_ptr, out_ptr, scale_ptr, shift_ptr, slot_row_ptr, token_idx_ptr, tile_seg_ptr, tile_start_ptr,
    seg_start_ptr, seg_adapter_ptr,
    N, stride_s_t, stride_s_n, stride_o_t, stride_o_n, stride_c_r, stride_c_n,
    HAS_SHIFT: tl.constexpr, ZERO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[rows] = src[rows] * scale[r] (+ shift[r]), or 0 with ZERO, for one tile of a scaled segment."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + pid_t)
    r = tl.load(slot_row_ptr + tl.load(seg_adapter_ptr + seg)).to(tl.int64)
    if r < 0:
        return
    t_end = tl.load(seg_start_ptr + seg + 1)
    offs_t = tl.load(tile_start_ptr + pid_t) + tl.arange(0, BLOCK_T)
    mask_t = offs_t < t_end
    rows = tl.load(token_idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = mask_t[:, None] & mask_n[None, :]
    if ZERO:
        v = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    else:
        v = tl.load(src_ptr + rows[:, None] * stride_s_t + offs_n[None, :] * stride_s_n, mask=mask, other=0.0)
        c = tl.load(scale_ptr + r * stride_c_r + offs_n * stride_c_n, mask=mask_n, other=0.0)
        v = v.to(tl.float32) * c.to(tl.float32)[None, :]
        if HAS_SHIFT:
            b = tl.load(shift_ptr + r * stride_c_r + offs_n * stride_c_n, mask=mask_n, other=0.0)
            v = v + b.to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o_t + offs_n[None, :] * stride_o_n,
             v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rowscale_dw_kernel(
    dout_ptr, x_ptr, dscale_ptr, dshift_ptr, part_ptr, slot_row_ptr, token_idx_ptr, chunk_seg_ptr,
    chunk_start_ptr, chunk_end_ptr, chunk_prow_ptr, seg_adapter_ptr,
    N, part_rows, stride_d_t, stride_d_n, stride_x_t, stride_x_n, stride_c_r, stride_c_n,
    NEED_SCALE: tl.constexpr, NEED_SHIFT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """sum_{t in chunk} dout[t] * x[t] (and sum dout[t]) for one column tile: into dscale[r] /
    dshift[r] when the chunk is its whole segment, else fp32 into part[prow] / part[part_rows + prow]."""
    chunk = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = tl.load(slot_row_ptr + tl.load(seg_adapter_ptr + tl.load(chunk_seg_ptr + chunk))).to(tl.int64)
    if r < 0:
        return
    t_begin = tl.load(chunk_start_ptr + chunk)
    t_end = tl.load(chunk_end_ptr + chunk)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        rows = tl.load(token_idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        mask = mask_t[:, None] & mask_n[None, :]
        d = tl.load(dout_ptr + rows[:, None] * stride_d_t + offs_n[None, :] * stride_d_n, mask=mask, other=0.0)
        d = d.to(tl.float32)
        if NEED_SCALE:
            x = tl.load(x_ptr + rows[:, None] * stride_x_t + offs_n[None, :] * stride_x_n, mask=mask, other=0.0)
            acc_s += tl.sum(d * x.to(tl.float32), axis=0)
        if NEED_SHIFT:
            acc_b += tl.sum(d, axis=0)
    prow = tl.load(chunk_prow_ptr + chunk)
    if prow < 0:
        if NEED_SCALE:
            tl.store(dscale_ptr + r * stride_c_r + offs_n * stride_c_n, acc_s.to(dscale_ptr.dtype.element_ty),
                     mask=mask_n)
        if NEED_SHIFT:
            tl.store(dshift_ptr + r * stride_c_r + offs_n * stride_c_n, acc_b.to(dshift_ptr.dtype.element_ty),
                     mask=mask_n)
    else:
        if NEED_SCALE:
            tl.store(part_ptr + prow.to(tl.int64) * N + offs_n, acc_s, mask=mask_n)
        if NEED_SHIFT:
            tl.store(part_ptr + (prow.to(tl.int64) + part_rows) * N + offs_n, acc_b, mask=mask_n)


@triton.jit
def _rowscale_dw_reduce_kernel(
    dscale_ptr, dshift_ptr, part_ptr, slot_row_ptr, red_seg_ptr, red_prow_ptr, red_n_ptr, seg_adapter_ptr,
    N, part_rows, stride_c_r, stride_c_n,
    NEED_SCALE: tl.constexpr, NEED_SHIFT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dscale[r] (dshift[r]) = sum_j part[prow + j] over a split segment's chunks, in order."""
    i = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = tl.load(slot_row_ptr + tl.load(seg_adapter_ptr + tl.load(red_seg_ptr + i))).to(tl.int64)
    if r < 0:
        return
    prow = tl.load(red_prow_ptr + i).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, tl.load(red_n_ptr + i)):
        if NEED_SCALE:
            acc_s += tl.load(part_ptr + (prow + j) * N + offs_n, mask=mask_n, other=0.0)
        if NEED_SHIFT:
            acc_b += tl.load(part_ptr + (prow + j + part_rows) * N + offs_n, mask=mask_n, other=0.0)
    if NEED_SCALE:
        tl.store(dscale_ptr + r * stride_c_r + offs_n * stride_c_n, acc_s.to(dscale_ptr.dtype.element_ty), mask=mask_n)
    if NEED_SHIFT:
        tl.store(dshift_ptr + r * stride_c_r + offs_n * stride_c_n, acc_b.to(dshift_ptr.dtype.element_ty), mask=mask_n)


# --- host launchers ---------------------------------------------------------------------------

BLOCK_T = 64
BLOCK_N = 64

# The routing as device tensors, what the kernels read and the custom ops take.
_Plan = namedtuple("_Plan", "token_idx seg_start seg_adapter tile_seg tile_start "
                            "chunk_seg chunk_start chunk_end chunk_prow red_seg red_prow red_n")


def _plan(routing: Routing) -> tuple[list, int]:
    """(the ``_Plan`` tensors as a list, rows of one fp32 partial buffer), cached by the routing."""
    S = routing.num_segments
    ch = routing.token_chunks((token_chunk_rows(1, BLOCK_T),) * S, (1,) * S)
    tables = (routing.token_idx, *routing.segment_tensors(), *routing.token_tiles(BLOCK_T), *ch[:7])
    return list(tables), ch.part_rows


def _scale_rows(src, out, scale, shift, slot_row, P, zero=False):
    """out[scaled rows] = src * scale[r] (+ shift[r]), or 0 with ``zero``; other rows untouched."""
    N = out.shape[1]
    _rowscale_kernel[(P.tile_seg.numel(), triton.cdiv(N, BLOCK_N))](
        src, out, scale, shift if shift is not None else scale, slot_row, P.token_idx, P.tile_seg, P.tile_start,
        P.seg_start, P.seg_adapter, N, src.stride(0), src.stride(1), out.stride(0), out.stride(1),
        scale.stride(0), scale.stride(1),
        HAS_SHIFT=shift is not None, ZERO=zero, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N,
    )


def _weight_grads(dout, x, dscale, dshift, slot_row, P, part_rows):
    """dscale[r] = sum over a's rows of dout * x, dshift[r] = sum of dout (either may be None: not
    asked for), per token chunk, then the chunks of a split segment summed in order:
    deterministic, no atomics."""
    N = dout.shape[1]
    part = torch.empty((2 * part_rows, N), dtype=torch.float32, device=dout.device)
    n_tiles = triton.cdiv(N, BLOCK_N)
    ref = dscale if dscale is not None else dshift
    flags = dict(NEED_SCALE=dscale is not None, NEED_SHIFT=dshift is not None)
    _rowscale_dw_kernel[(P.chunk_seg.numel(), n_tiles)](
        dout, x, ref if dscale is None else dscale, ref if dshift is None else dshift, part, slot_row, P.token_idx,
        P.chunk_seg, P.chunk_start, P.chunk_end, P.chunk_prow, P.seg_adapter,
        N, part_rows, dout.stride(0), dout.stride(1), x.stride(0), x.stride(1), ref.stride(0), ref.stride(1),
        BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, **flags,
    )
    if P.red_seg.numel():
        _rowscale_dw_reduce_kernel[(P.red_seg.numel(), n_tiles)](
            ref if dscale is None else dscale, ref if dshift is None else dshift, part, slot_row, P.red_seg,
            P.red_prow, P.red_n, P.seg_adapter, N, part_rows, ref.stride(0), ref.stride(1), BLOCK_N=BLOCK_N, **flags,
        )


# --- custom ops and autograd ------------------------------------------------------------------
# torch.library ops with fake implementations, as the LoRA linear's (see lora/triton_lora.py).

@torch.library.custom_op("lora_engine::routed_scale", mutates_args=())
def _routed_scale_op(x: torch.Tensor, scale: torch.Tensor, slot_row: torch.Tensor, shift: Optional[torch.Tensor],
                     base: Optional[torch.Tensor], plan: list[torch.Tensor], part_rows: int,
                     active: bool) -> torch.Tensor:
    out = (x if base is None else base).clone()
    if active:
        _scale_rows(x, out, scale, shift, slot_row, _Plan(*plan))
    return out


@_routed_scale_op.register_fake
def _(x, scale, slot_row, shift, base, plan, part_rows, active):
    return torch.empty_like(x)


@torch.library.custom_op("lora_engine::routed_scale_backward", mutates_args=())
def _routed_scale_bwd_op(dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, slot_row: torch.Tensor,
                         has_shift: bool, has_base: bool, plan: list[torch.Tensor], part_rows: int, active: bool,
                         need_x: bool, need_scale: bool, need_shift: bool, need_base: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dscale, dshift, dbase); a gradient not asked for comes back as an empty tensor."""
    P = _Plan(*plan)
    dx, dscale, dshift, dbase = (dout.new_empty(0) for _ in range(4))
    if need_x:
        # Without base, an unscaled row of out is x itself (dx = dout); with it, x is unused there.
        dx = torch.zeros_like(x) if has_base else dout.to(x.dtype, copy=True)
        if active:
            _scale_rows(dout, dx, scale, None, slot_row, P)
    if need_base and has_base:
        dbase = dout.clone()
        if active:
            _scale_rows(dout, dbase, scale, None, slot_row, P, zero=True)
    need_shift = need_shift and has_shift
    if need_scale or need_shift:
        ds = torch.zeros_like(scale) if need_scale else None
        db = torch.zeros_like(scale) if need_shift else None
        if active:
            _weight_grads(dout, x, ds, db, slot_row, P, part_rows)
        dscale = ds if need_scale else dscale
        dshift = db if need_shift else dshift
    return dx, dscale, dshift, dbase


@_routed_scale_bwd_op.register_fake
def _(dout, x, scale, slot_row, has_shift, has_base, plan, part_rows, active, need_x, need_scale, need_shift,
      need_base):
    empty = lambda: dout.new_empty(0)  # noqa: E731
    return (torch.empty_like(x) if need_x else empty(), torch.empty_like(scale) if need_scale else empty(),
            torch.empty_like(scale) if need_shift and has_shift else empty(),
            torch.empty_like(dout) if need_base and has_base else empty())


def _routed_scale_setup(ctx, inputs, output):
    x, scale, slot_row, shift, base, plan, part_rows, active = inputs
    ctx.save_for_backward(x, scale, slot_row, *plan)
    ctx.has_shift, ctx.has_base = shift is not None, base is not None
    ctx.part_rows, ctx.active = part_rows, active


def _routed_scale_backward(ctx, dout):
    x, scale, slot_row, *plan = ctx.saved_tensors
    need_x, need_scale, _, need_shift, need_base = ctx.needs_input_grad[:5]
    dx, dscale, dshift, dbase = _routed_scale_bwd_op(
        dout.contiguous(), x, scale, slot_row, ctx.has_shift, ctx.has_base, plan, ctx.part_rows, ctx.active,
        need_x, need_scale, need_shift, need_base)
    return ((dx if need_x else None), (dscale if need_scale else None), None,
            (dshift if need_shift and ctx.has_shift else None), (dbase if need_base and ctx.has_base else None),
            [None] * len(plan), None, None)


_routed_scale_op.register_autograd(_routed_scale_backward, setup_context=_routed_scale_setup)


# --- public function ----------------------------------------------------------------------

def routed_scale_triton(x: torch.Tensor, scale: torch.Tensor, slot_row: torch.Tensor, routing: Routing,
                        shift: torch.Tensor | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    """Routed row scale, Triton path (the custom op ``torch.ops.lora_engine.routed_scale``).

    Args:
        x: [T, N] fp32/fp16/bf16 rows (IA3: a layer's input or output; LN tuning: the unit-affine
            norm output).
        scale: [n, N] float, one row per scaled adapter (IA3's l, LN tuning's weight); computed in
            fp32, its gradient comes back in its dtype.
        slot_row: [A] int32/int64 on x's device: the row of ``scale`` of each adapter slot, -1 for
            the slots left as they are.
        routing: which rows belong to which adapter (``Routing``).
        shift: [n, N] like scale (LN tuning's bias) or None.
        base: [T, N] like x: the value of the rows left as they are (LN tuning: the base norm's
            output); None: x itself.
    Returns:
        out: [T, N] in x.dtype. Gradients flow to x, scale, shift and base.
    """
    check_row_scale_inputs(x, scale, slot_row, routing, shift, base)
    plan, part_rows = _plan(routing)
    return _routed_scale_op(x.contiguous(), scale.contiguous(), slot_row,
                            None if shift is None else shift.contiguous(),
                            None if base is None else base.contiguous(), plan, part_rows, routing.num_routed > 0)
