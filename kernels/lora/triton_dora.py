"""DoRA's per-column scale as an epilogue over the multi-adapter LoRA output, in Triton.

    out[t] = y[t] + (g_a - 1) * (y[t] - bias)      for the rows t of every DoRA adapter a
    out[t] = y[t]                                  for every other row

``y = x W^T + bias + s_a (x A_a^T) B_a^T`` comes from ``lora_linear``; ``g_a = m_a / ||W + s_a B_a A_a||_c``
([N], the norm detached as PEFT does) turns it into DoRA's ``bias + g_a * (x W^T + s_a x A_a^T B_a^T)``.
Written as ``y + (g - 1) * (y - bias)`` rather than ``bias + g * (y - bias)`` so that at g = 1
(DoRA's init, m = ||W||_c) the output is bitwise y: (y - b) + b is not y in floating point.

Backward: dy = dout + (g_a - 1) * dout on the DoRA rows (dout elsewhere), and
dg_a = sum_{t in a} dout[t] * (y[t] - bias), one program per (token chunk, column tile) reducing
its rows in order, then one per (split segment, column tile) summing its chunks' fp32 partials
in order: deterministic, no atomics (chunks of ``layout.token_chunk_rows(1)`` = 1024 rows: one
DoRA adapter of 16384 tokens at N=4096 runs 16 x 64 programs, not 64).
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch
import triton
import triton.language as tl

from .layout import Routing, check_column_scale_inputs, token_chunk_rows


# --- kernels ------------------------------------------------------------------------------

@triton.jit
def _colscale_kernel(
    y_ptr, out_ptr, bias_ptr, g_ptr, flag_ptr, token_idx_ptr, tile_seg_ptr, tile_start_ptr,
    seg_start_ptr, seg_adapter_ptr,
    N, stride_y_t, stride_y_n, stride_o_t, stride_o_n, stride_g_a, stride_g_n,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[rows] = y[rows] + (g[a] - 1) * (y[rows] - bias) for one tile of a flagged adapter's segment."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + pid_t)
    adapter = tl.load(seg_adapter_ptr + seg)
    if tl.load(flag_ptr + adapter) == 0:
        return
    t_end = tl.load(seg_start_ptr + seg + 1)
    offs_t = tl.load(tile_start_ptr + pid_t) + tl.arange(0, BLOCK_T)
    mask_t = offs_t < t_end
    rows = tl.load(token_idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = mask_t[:, None] & mask_n[None, :]
    y = tl.load(y_ptr + rows[:, None] * stride_y_t + offs_n[None, :] * stride_y_n, mask=mask, other=0.0)
    y = y.to(tl.float32)
    g = tl.load(g_ptr + adapter.to(tl.int64) * stride_g_a + offs_n * stride_g_n, mask=mask_n, other=1.0)
    g = g.to(tl.float32)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        out = y + (g[None, :] - 1.0) * (y - b[None, :])
    else:
        out = y + (g[None, :] - 1.0) * y
    tl.store(out_ptr + rows[:, None] * stride_o_t + offs_n[None, :] * stride_o_n,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _colscale_dg_kernel(
    dout_ptr, y_ptr, bias_ptr, dg_ptr, part_ptr, flag_ptr, token_idx_ptr, chunk_seg_ptr, chunk_start_ptr,
    chunk_end_ptr, chunk_prow_ptr, seg_adapter_ptr,
    N, stride_d_t, stride_d_n, stride_y_t, stride_y_n, stride_g_a, stride_g_n,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """sum_{t in chunk} dout[t, n] * (y[t, n] - bias[n]) for one column tile: into dg[a, n] when
    the chunk is its whole segment, else fp32 into part[prow, n]."""
    chunk = tl.program_id(0)
    pid_n = tl.program_id(1)
    adapter = tl.load(seg_adapter_ptr + tl.load(chunk_seg_ptr + chunk))
    if tl.load(flag_ptr + adapter) == 0:
        return
    t_begin = tl.load(chunk_start_ptr + chunk)
    t_end = tl.load(chunk_end_ptr + chunk)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        rows = tl.load(token_idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        mask = mask_t[:, None] & mask_n[None, :]
        d = tl.load(dout_ptr + rows[:, None] * stride_d_t + offs_n[None, :] * stride_d_n, mask=mask, other=0.0)
        y = tl.load(y_ptr + rows[:, None] * stride_y_t + offs_n[None, :] * stride_y_n, mask=mask, other=0.0)
        y = y.to(tl.float32)
        if HAS_BIAS:
            # Masked rows/columns load d = 0, so the bias they subtract adds nothing.
            y = y - b[None, :]
        acc += tl.sum(d.to(tl.float32) * y, axis=0)
    prow = tl.load(chunk_prow_ptr + chunk)
    if prow < 0:
        tl.store(dg_ptr + adapter.to(tl.int64) * stride_g_a + offs_n * stride_g_n,
                 acc.to(dg_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.store(part_ptr + prow.to(tl.int64) * N + offs_n, acc, mask=mask_n)


@triton.jit
def _colscale_dg_reduce_kernel(
    dg_ptr, part_ptr, flag_ptr, red_seg_ptr, red_prow_ptr, red_n_ptr, seg_adapter_ptr,
    N, stride_g_a, stride_g_n, BLOCK_N: tl.constexpr,
):
    """dg[a, n] = sum_j part[prow + j, n] over a split segment's chunks, in order."""
    i = tl.program_id(0)
    pid_n = tl.program_id(1)
    adapter = tl.load(seg_adapter_ptr + tl.load(red_seg_ptr + i))
    if tl.load(flag_ptr + adapter) == 0:
        return
    prow = tl.load(red_prow_ptr + i)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, tl.load(red_n_ptr + i)):
        acc += tl.load(part_ptr + (prow + j).to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
    tl.store(dg_ptr + adapter.to(tl.int64) * stride_g_a + offs_n * stride_g_n,
             acc.to(dg_ptr.dtype.element_ty), mask=mask_n)


# --- host launchers ---------------------------------------------------------------------------

BLOCK_T = 64
BLOCK_N = 64


# The routing as device tensors, what the kernels read and the custom ops take.
_Plan = namedtuple("_Plan", "token_idx seg_start seg_adapter tile_seg tile_start "
                            "chunk_seg chunk_start chunk_end chunk_prow red_seg red_prow red_n")


def _plan(routing: Routing, scaled: tuple[bool, ...]) -> tuple[list, int]:
    """(flags, then the ``_Plan`` tensors, as a list; rows of the fp32 partial buffer), cached."""
    S = routing.num_segments
    ch = routing.token_chunks((token_chunk_rows(1, BLOCK_T),) * S, (1,) * S)
    tables = (routing.flag_tensor(scaled), routing.token_idx, *routing.segment_tensors(),
              *routing.token_tiles(BLOCK_T), *ch[:7])
    return list(tables), ch.part_rows


def _colscale_(y, out, bias, g, flags, P, has_bias):
    """out[rows of flagged adapters] = y + (g - 1) * (y - bias); other rows of out untouched."""
    N = y.shape[1]
    _colscale_kernel[(P.tile_seg.numel(), triton.cdiv(N, BLOCK_N))](
        y, out, bias if has_bias else y, g, flags, P.token_idx, P.tile_seg, P.tile_start, P.seg_start,
        P.seg_adapter, N, y.stride(0), y.stride(1), out.stride(0), out.stride(1), g.stride(0), g.stride(1),
        HAS_BIAS=has_bias, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N,
    )


def _colscale_dg(dout, y, bias, dg, flags, P, part_rows):
    """dg[a] = sum over a's rows of dout * (y - bias), per token chunk (``token_chunk_rows`` at
    width 1), then the chunks of a split segment summed in order: deterministic, no atomics."""
    N = y.shape[1]
    part = torch.empty((part_rows, N), dtype=torch.float32, device=y.device)
    n_tiles = triton.cdiv(N, BLOCK_N)
    _colscale_dg_kernel[(P.chunk_seg.numel(), n_tiles)](
        dout, y, bias if bias is not None else y, dg, part, flags, P.token_idx, P.chunk_seg,
        P.chunk_start, P.chunk_end, P.chunk_prow, P.seg_adapter,
        N, dout.stride(0), dout.stride(1), y.stride(0), y.stride(1), dg.stride(0), dg.stride(1),
        HAS_BIAS=bias is not None, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N,
    )
    if P.red_seg.numel():
        _colscale_dg_reduce_kernel[(P.red_seg.numel(), n_tiles)](
            dg, part, flags, P.red_seg, P.red_prow, P.red_n, P.seg_adapter,
            N, dg.stride(0), dg.stride(1), BLOCK_N=BLOCK_N,
        )


# --- custom ops and autograd ------------------------------------------------------------------
# torch.library ops with fake implementations, as the LoRA linear's (see triton_lora.py).

@torch.library.custom_op("lora_engine::lora_column_scale", mutates_args=())
def _column_scale_op(y: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor, plan: list[torch.Tensor],
                     part_rows: int, active: bool) -> torch.Tensor:
    out = y.clone()
    if active:
        _colscale_(y, out, bias, scale, plan[0], _Plan(*plan[1:]), has_bias=bias is not None)
    return out


@_column_scale_op.register_fake
def _(y, bias, scale, plan, part_rows, active):
    return torch.empty_like(y)


@torch.library.custom_op("lora_engine::lora_column_scale_backward", mutates_args=())
def _column_scale_bwd_op(dout: torch.Tensor, y: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
                         plan: list[torch.Tensor], part_rows: int, active: bool, need_y: bool, need_bias: bool,
                         need_scale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dbias, dscale); a gradient not asked for comes back as an empty tensor."""
    flags, P = plan[0], _Plan(*plan[1:])
    # Distinct empty tensors: a custom op's outputs may not alias each other.
    dy, dbias, dscale = dout.new_empty(0), dout.new_empty(0), dout.new_empty(0)
    need_bias = need_bias and bias is not None
    if need_y or need_bias:
        # dbias needs dy in fp32: dout - dy cancels to (1 - g) dout, ~0.2 dout, so a dy
        # rounded to fp16 first made dbias 4x as wrong as PyTorch's (1.3e-3 vs 3.2e-4).
        dy = dout.to(torch.float32 if need_bias else dout.dtype, copy=True)
        if active:
            _colscale_(dout, dy, None, scale, flags, P, has_bias=False)
    if need_bias:
        # d out / d bias = 1 - g on the DoRA rows, 0 elsewhere: dout - dy.
        dbias = (dout.float() - dy).sum(0).to(bias.dtype)
        dy = dy.to(dout.dtype)
    if need_scale:
        dscale = torch.zeros_like(scale)
        if active:
            _colscale_dg(dout, y, bias, dscale, flags, P, part_rows)
    return (dy if need_y else dout.new_empty(0)), dbias, dscale


@_column_scale_bwd_op.register_fake
def _(dout, y, bias, scale, plan, part_rows, active, need_y, need_bias, need_scale):
    empty = lambda: dout.new_empty(0)  # noqa: E731
    return (torch.empty_like(dout) if need_y else empty(),
            torch.empty_like(bias) if need_bias and bias is not None else empty(),
            torch.empty_like(scale) if need_scale else empty())


def _column_scale_setup(ctx, inputs, output):
    y, bias, scale, plan, part_rows, active = inputs
    ctx.save_for_backward(y, bias, scale, *plan)
    ctx.part_rows, ctx.active = part_rows, active


def _column_scale_backward(ctx, dout):
    y, bias, scale, *plan = ctx.saved_tensors
    need_y, need_bias, need_scale = ctx.needs_input_grad[:3]
    dy, dbias, dscale = _column_scale_bwd_op(dout.contiguous(), y, bias, scale, plan, ctx.part_rows, ctx.active,
                                             need_y, need_bias, need_scale)
    return ((dy if need_y else None), (dbias if need_bias and bias is not None else None),
            (dscale if need_scale else None), [None] * len(plan), None, None)


_column_scale_op.register_autograd(_column_scale_backward, setup_context=_column_scale_setup)


# --- public function ----------------------------------------------------------------------

def lora_column_scale_triton(y: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                             scaled: tuple[bool, ...], routing: Routing) -> torch.Tensor:
    """DoRA epilogue, Triton path (the custom op ``torch.ops.lora_engine.lora_column_scale``):
    ``out[t] = y[t] + (scale[a] - 1) * (y[t] - bias)`` on flagged adapters' rows.

    Args:
        y: [T, N] fp32/fp16/bf16, the ``lora_linear`` output (base + bias + LoRA update).
        bias: [N] the base layer's bias (any float dtype) or None.
        scale: [A, N] float, one row per adapter slot (DoRA: m / ||W + s B A||_c; rows of
            unflagged slots are ignored). Computed in fp32; its gradient comes back in its dtype.
        scaled: A host bools, True for the slots to scale (the DoRA adapters).
        routing: which rows belong to which adapter (``Routing``).
    Returns:
        out: [T, N] in y.dtype. Gradients flow to y, scale (and bias if it requires grad).
    """
    check_column_scale_inputs(y, bias, scale, scaled, routing)
    scaled = tuple(bool(f) for f in scaled)
    plan, part_rows = _plan(routing, scaled)
    return _column_scale_op(y.contiguous(), bias, scale.contiguous(), plan, part_rows,
                            routing.num_routed > 0 and any(scaled))
