"""Multi-adapter LoRA linear in Triton: forward and backward over sorted token segments.

    y = x W^T + b + s_a (x A_a^T) B_a^T        for every row of adapter a (a = -1: base only)

Adapters of different ranks are packed along the rank axis without padding
(``A_all [sum R, K]``, ``B_all [N, sum R]``, offsets in ``LoRALayout``). The base GEMM runs in
cuBLAS (x @ W^T and dy @ W); three kernels do the LoRA part:

- ``_shrink_kernel``  U[t, :R_a] = s? * rows(x)[t] @ Wt_a^T   (x @ A_a^T forward, dy @ B_a backward)
- ``_expand_kernel``  out[rows[t]] += s? * U[t, :R_a] @ Wt_a   (adds into y forward, into dx backward)
- ``_wgrad_kernel``   G_a = s? * P_seg^T @ rows(Q)_seg         (dA_a = dU^T x, dB_a = s dy^T U),
  per token chunk of the segment (``layout.token_chunk_rows``), then ``_wgrad_reduce_kernel``
  sums a split segment's fp32 partials in chunk order

fp32 inputs use IEEE fp32 dots (Triton's default for fp32 is tf32, ~1e-3 relative error, which
would make a default fp32 run's LoRA update less exact than its base GEMM).

The launches sit inside two ``torch.library`` custom ops (forward, backward) with fake
implementations, so ``torch.compile`` traces through the layer and CUDA graphs can capture it.

Every output element has exactly one owning program (or, for a segment split into token chunks,
one per chunk and then one reducing the chunks in order), so gradients are deterministic with
no atomics. Rows are addressed through ``token_idx`` (gather/scatter in the
loads and stores), so the activations are never permuted in memory.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch
import triton
import triton.language as tl

from .layout import LoRALayout, Routing, check_lora_inputs, token_chunk_rows


# --- kernels ------------------------------------------------------------------------------

@triton.jit
def _shrink_kernel(
    x_ptr, w_ptr, u_ptr, token_idx_ptr, tile_seg_ptr, tile_start_ptr, seg_start_ptr,
    seg_adapter_ptr, rank_ptr, rank_off_ptr, scale_ptr,
    K, stride_x_t, stride_x_k, stride_w_r, stride_w_k, stride_u_t, stride_u_r,
    APPLY_SCALE: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """U[t, r] = sum_k x[token_idx[t], k] * w[off_a + r, k]   for t in a tile of segment s."""
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + pid_t)
    adapter = tl.load(seg_adapter_ptr + seg)
    R = tl.load(rank_ptr + adapter)
    r0 = pid_r * BLOCK_R
    if r0 >= R:
        return
    r_off = tl.load(rank_off_ptr + adapter)
    t_end = tl.load(seg_start_ptr + seg + 1)
    offs_t = tl.load(tile_start_ptr + pid_t) + tl.arange(0, BLOCK_T)
    mask_t = offs_t < t_end
    rows = tl.load(token_idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    w_rows = (r_off + offs_r).to(tl.int64)

    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rows[:, None] * stride_x_t + offs_k[None, :] * stride_x_k,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + w_rows[None, :] * stride_w_r + offs_k[:, None] * stride_w_k,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if APPLY_SCALE:
        acc *= tl.load(scale_ptr + adapter)
    u_ptrs = u_ptr + offs_t.to(tl.int64)[:, None] * stride_u_t + offs_r[None, :] * stride_u_r
    tl.store(u_ptrs, acc.to(u_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(
    u_ptr, w_ptr, out_ptr, token_idx_ptr, tile_seg_ptr, tile_start_ptr, seg_start_ptr,
    seg_adapter_ptr, rank_ptr, rank_off_ptr, scale_ptr,
    N, stride_u_t, stride_u_r, stride_w_n, stride_w_r, stride_o_t, stride_o_n,
    APPLY_SCALE: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[token_idx[t], n] += sum_r U[t, r] * w[n, off_a + r]   for t in a tile of segment s."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + pid_t)
    adapter = tl.load(seg_adapter_ptr + seg)
    R = tl.load(rank_ptr + adapter)
    if R == 0:
        return
    r_off = tl.load(rank_off_ptr + adapter)
    t_end = tl.load(seg_start_ptr + seg + 1)
    offs_t = tl.load(tile_start_ptr + pid_t) + tl.arange(0, BLOCK_T)
    mask_t = offs_t < t_end
    rows = tl.load(token_idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        u = tl.load(u_ptr + offs_t.to(tl.int64)[:, None] * stride_u_t + offs_r[None, :] * stride_u_r,
                    mask=mask_t[:, None] & mask_r[None, :], other=0.0)
        w = tl.load(w_ptr + (r_off + offs_r).to(tl.int64)[:, None] * stride_w_r
                    + offs_n[None, :] * stride_w_n,
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(u, w, input_precision="ieee")
        else:
            acc += tl.dot(u, w)
    if APPLY_SCALE:
        acc *= tl.load(scale_ptr + adapter)
    o_ptrs = out_ptr + rows[:, None] * stride_o_t + offs_n[None, :] * stride_o_n
    o_mask = mask_t[:, None] & mask_n[None, :]
    # The add happens in fp32 before one rounding to the output dtype: one rounding fewer than
    # PyTorch's `base + lora` in bf16.
    out = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32) + acc
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _wgrad_kernel(
    p_ptr, q_ptr, g_ptr, part_ptr, token_idx_ptr, chunk_seg_ptr, chunk_start_ptr, chunk_end_ptr,
    chunk_prow_ptr, seg_adapter_ptr, rank_ptr, rank_off_ptr, scale_ptr,
    K, stride_p_t, stride_p_r, stride_q_t, stride_q_k, stride_g_r, stride_g_k,
    APPLY_SCALE: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """sum_{t in chunk} P[t, r] * Q[token_idx[t], k] for one tile of G: straight into
    G[off_a + r, k] when the chunk is its whole segment, else fp32 into part[prow + r, k]."""
    chunk = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    adapter = tl.load(seg_adapter_ptr + tl.load(chunk_seg_ptr + chunk))
    R = tl.load(rank_ptr + adapter)
    r0 = pid_r * BLOCK_R
    if r0 >= R:
        return
    t_begin = tl.load(chunk_start_ptr + chunk)
    t_end = tl.load(chunk_end_ptr + chunk)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        rows = tl.load(token_idx_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        p = tl.load(p_ptr + offs_t.to(tl.int64)[:, None] * stride_p_t + offs_r[None, :] * stride_p_r,
                    mask=mask_t[:, None] & mask_r[None, :], other=0.0)
        q = tl.load(q_ptr + rows[:, None] * stride_q_t + offs_k[None, :] * stride_q_k,
                    mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(tl.trans(p), q, input_precision="ieee")
        else:
            acc += tl.dot(tl.trans(p), q)
    mask = mask_r[:, None] & mask_k[None, :]
    prow = tl.load(chunk_prow_ptr + chunk)
    if prow < 0:
        if APPLY_SCALE:
            acc *= tl.load(scale_ptr + adapter)
        r_off = tl.load(rank_off_ptr + adapter)
        g_ptrs = g_ptr + (r_off + offs_r).to(tl.int64)[:, None] * stride_g_r + offs_k[None, :] * stride_g_k
        tl.store(g_ptrs, acc.to(g_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (prow + offs_r).to(tl.int64)[:, None] * K + offs_k[None, :], acc, mask=mask)


@triton.jit
def _wgrad_reduce_kernel(
    g_ptr, part_ptr, red_seg_ptr, red_prow_ptr, red_n_ptr, seg_adapter_ptr, rank_ptr, rank_off_ptr,
    scale_ptr, K, stride_g_r, stride_g_k,
    APPLY_SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """G[off_a + r, k] = (s *) sum_j part[prow + j * R + r, k] over a split segment's chunks, in order."""
    i = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    adapter = tl.load(seg_adapter_ptr + tl.load(red_seg_ptr + i))
    R = tl.load(rank_ptr + adapter)
    r0 = pid_r * BLOCK_R
    if r0 >= R:
        return
    prow = tl.load(red_prow_ptr + i)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_r < R)[:, None] & (offs_k < K)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for j in range(0, tl.load(red_n_ptr + i)):
        rows = (prow + j * R + offs_r).to(tl.int64)
        acc += tl.load(part_ptr + rows[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
    if APPLY_SCALE:
        acc *= tl.load(scale_ptr + adapter)
    r_off = tl.load(rank_off_ptr + adapter)
    g_ptrs = g_ptr + (r_off + offs_r).to(tl.int64)[:, None] * stride_g_r + offs_k[None, :] * stride_g_k
    tl.store(g_ptrs, acc.to(g_ptr.dtype.element_ty), mask=mask)


# --- host launchers ---------------------------------------------------------------------------

BLOCK_T = 64
BLOCK_K = 64
BLOCK_N = 64


# The layout and routing as device tensors: what the kernels read, and what the custom ops take
# (plain tensors, so torch.compile and CUDA graphs see no Python objects).
_Plan = namedtuple("_Plan", "token_idx seg_start seg_adapter tile_seg tile_start ranks offsets scales "
                            "chunk_seg chunk_start chunk_end chunk_prow red_seg red_prow red_n")


def _chunks(layout, routing):
    """Token chunks of every segment for the weight-gradient kernels (``token_chunk_rows``);
    a rank-0 adapter's segment stays one chunk (its programs exit at once)."""
    ranks = [layout.ranks[a] for a in routing.seg_adapter]
    rows = tuple(token_chunk_rows(r, BLOCK_T) if r else max(routing.num_routed, 1) for r in ranks)
    return routing.token_chunks(rows, tuple(ranks))


def _plan(layout: LoRALayout, routing: Routing, device) -> tuple[list, int]:
    """(the ``_Plan`` tensors as a list, rows of the fp32 partial buffer), all cached on the
    layout and routing: no host->device copy after the first layer of a batch."""
    ch = _chunks(layout, routing)
    tables = (routing.token_idx, *routing.segment_tensors(), *routing.token_tiles(BLOCK_T),
              *layout.device_tensors(device), *ch[:7])
    return list(tables), ch.part_rows


def _block_r(max_rank: int) -> int:
    # tl.dot needs every dimension >= 16; past 64 the register tile of the shrink grows with no gain.
    return min(64, max(16, triton.next_power_of_2(max(max_rank, 1))))


def _shrink(x, w, stride_w_r, stride_w_k, P, max_rank, apply_scale):
    """U [T_routed, max R] in x.dtype; columns past an adapter's rank are left unwritten (zeros)."""
    K = x.shape[1]
    u = torch.zeros((P.token_idx.numel(), max_rank), dtype=x.dtype, device=x.device)
    block_r = _block_r(max_rank)
    _shrink_kernel[(P.tile_seg.numel(), triton.cdiv(max_rank, block_r))](
        x, w, u, P.token_idx, P.tile_seg, P.tile_start, P.seg_start, P.seg_adapter, P.ranks, P.offsets, P.scales,
        K, x.stride(0), x.stride(1), stride_w_r, stride_w_k, u.stride(0), u.stride(1),
        APPLY_SCALE=apply_scale, IEEE=x.dtype == torch.float32, BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
    )
    return u


def _expand_(u, w, stride_w_n, stride_w_r, out, P, max_rank, apply_scale):
    """out[rows] += (s *) U @ w_a^T, in place."""
    N = out.shape[1]
    _expand_kernel[(P.tile_seg.numel(), triton.cdiv(N, BLOCK_N))](
        u, w, out, P.token_idx, P.tile_seg, P.tile_start, P.seg_start, P.seg_adapter, P.ranks, P.offsets, P.scales,
        N, u.stride(0), u.stride(1), stride_w_n, stride_w_r, out.stride(0), out.stride(1),
        APPLY_SCALE=apply_scale, IEEE=u.dtype == torch.float32, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N,
        BLOCK_R=_block_r(max_rank),
    )


def _wgrad(p, q, g, stride_g_r, stride_g_k, P, max_rank, part_rows, apply_scale):
    """g[rank rows of a, :] = (s *) P_a^T @ Q[rows of a] for every segment; g pre-zeroed.

    Token chunks run in parallel (``_chunks``); a segment of several chunks leaves fp32 partials
    that ``_wgrad_reduce_kernel`` sums in chunk order: deterministic, no atomics."""
    K = q.shape[1]
    part = torch.empty((part_rows, K), dtype=torch.float32, device=q.device)
    block_r = _block_r(max_rank)
    r_tiles, k_tiles = triton.cdiv(max_rank, block_r), triton.cdiv(K, BLOCK_K)
    _wgrad_kernel[(P.chunk_seg.numel(), r_tiles, k_tiles)](
        p, q, g, part, P.token_idx, P.chunk_seg, P.chunk_start, P.chunk_end, P.chunk_prow,
        P.seg_adapter, P.ranks, P.offsets, P.scales,
        K, p.stride(0), p.stride(1), q.stride(0), q.stride(1), stride_g_r, stride_g_k,
        APPLY_SCALE=apply_scale, IEEE=q.dtype == torch.float32, BLOCK_T=BLOCK_T, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
    )
    if P.red_seg.numel():
        _wgrad_reduce_kernel[(P.red_seg.numel(), r_tiles, k_tiles)](
            g, part, P.red_seg, P.red_prow, P.red_n, P.seg_adapter, P.ranks, P.offsets, P.scales,
            K, stride_g_r, stride_g_k, APPLY_SCALE=apply_scale, BLOCK_R=block_r, BLOCK_K=BLOCK_K,
        )


# --- custom ops and autograd ------------------------------------------------------------------
# torch.library ops with fake (meta) implementations: torch.compile traces through them without a
# graph break, and CUDA graphs can capture them (no host sync, no Python objects inside).

@torch.library.custom_op("lora_engine::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                    lora_b: torch.Tensor, plan: list[torch.Tensor], max_rank: int,
                    part_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [T, N], U [T_routed, max R] saved for the backward)."""
    P = _Plan(*plan)
    y = torch.addmm(bias, x, weight.T) if bias is not None else x @ weight.T
    if P.token_idx.numel() == 0 or max_rank == 0:
        return y, x.new_zeros((P.token_idx.numel(), max_rank))
    u = _shrink(x, lora_a, lora_a.stride(0), lora_a.stride(1), P, max_rank, apply_scale=False)
    _expand_(u, lora_b, lora_b.stride(0), lora_b.stride(1), y, P, max_rank, apply_scale=True)
    return y, u


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, plan, max_rank, part_rows):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((plan[0].shape[0], max_rank))


@torch.library.custom_op("lora_engine::lora_linear_backward", mutates_args=())
def _lora_linear_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                        lora_b: torch.Tensor, u: torch.Tensor, plan: list[torch.Tensor], max_rank: int,
                        part_rows: int, need_x: bool, need_a: bool,
                        need_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA_all, dB_all); a gradient not asked for comes back as an empty tensor."""
    P = _Plan(*plan)
    active = P.token_idx.numel() > 0 and max_rank > 0
    # Distinct empty tensors: a custom op's outputs may not alias each other.
    dx, da, db, du = dy.new_empty(0), dy.new_empty(0), dy.new_empty(0), None
    if active and (need_x or need_a):
        # dU = s_a dy @ B_a: a shrink with B_all read as [sum R, N] (strides swapped).
        du = _shrink(dy, lora_b, lora_b.stride(1), lora_b.stride(0), P, max_rank, apply_scale=True)
    if need_x:
        dx = dy @ weight
        if du is not None:
            # dx[rows] += dU @ A_a: an expand with A_all read as [K, sum R].
            _expand_(du, lora_a, lora_a.stride(1), lora_a.stride(0), dx, P, max_rank, apply_scale=False)
    if need_a:
        da = torch.zeros_like(lora_a)
        if du is not None:
            _wgrad(du, x, da, da.stride(0), da.stride(1), P, max_rank, part_rows, apply_scale=False)
    if need_b:
        db = torch.zeros_like(lora_b)
        if active:
            # dB_a = s_a dy_seg^T U_seg, stored transposed into B_all's columns.
            _wgrad(u, dy, db, db.stride(1), db.stride(0), P, max_rank, part_rows, apply_scale=True)
    return dx, da, db


@_lora_linear_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, u, plan, max_rank, part_rows, need_x, need_a, need_b):
    like = lambda t, need: torch.empty_like(t) if need else dy.new_empty(0)
    return like(x, need_x), like(lora_a, need_a), like(lora_b, need_b)


def _lora_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, plan, max_rank, part_rows = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], *plan)
    ctx.max_rank, ctx.part_rows, ctx.has_bias = max_rank, part_rows, bias is not None


def _lora_backward(ctx, dy, du_unused):
    x, weight, lora_a, lora_b, u, *plan = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    dy = dy.contiguous()
    dx, da, db = _lora_linear_bwd_op(dy, x, weight, lora_a, lora_b, u, plan, ctx.max_rank, ctx.part_rows,
                                     need_x, need_a, need_b)
    dweight = dy.T @ x if need_w else None
    dbias = dy.sum(0) if need_bias and ctx.has_bias else None
    return (dx if need_x else None), dweight, dbias, (da if need_a else None), (db if need_b else None), \
        [None] * len(plan), None, None


_lora_linear_op.register_autograd(_lora_backward, setup_context=_lora_setup)


# --- public function ----------------------------------------------------------------------

def lora_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       lora_a: torch.Tensor, lora_b: torch.Tensor, layout: LoRALayout,
                       routing: Routing) -> torch.Tensor:
    """Multi-adapter LoRA linear, Triton path (the custom op ``torch.ops.lora_engine.lora_linear``).

    Args:
        x: [T, K] fp32/fp16/bf16 activations (rows of all adapters, any order).
        weight: [N, K] frozen base weight, x.dtype. bias: [N] or None.
        lora_a: [sum R, K] all adapters' A packed by ``layout`` (x.dtype).
        lora_b: [N, sum R] all adapters' B packed by ``layout`` (x.dtype).
        layout: ranks, offsets and scales per adapter (``LoRALayout``).
        routing: which rows belong to which adapter (``Routing``, built once per batch).
    Returns:
        y: [T, N] in x.dtype. Gradients flow to x, lora_a, lora_b (and weight/bias if they require it).
    """
    check_lora_inputs(x, weight, bias, lora_a, lora_b, layout, routing)
    plan, part_rows = _plan(layout, routing, x.device)
    y, _ = _lora_linear_op(x.contiguous(), weight, bias, lora_a.contiguous(), lora_b.contiguous(), plan,
                           layout.max_rank, part_rows)
    return y
