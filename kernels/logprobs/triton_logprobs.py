"""Fused per-token log-probs (+ entropy) from hidden states, streamed over the vocabulary.

    z = (h @ W^T) / temperature      logp_t = z[t, y_t] - lse_t      H_t = lse_t - sum_v p_tv z_tv

No [T, V] tensor is ever allocated (fp32 logits for T=16384, V=151936 would be 10 GB):

- ``_logprobs_fwd_kernel``, one program per (T block, V split): each walks its vocabulary range
  in [BLOCK_T, BLOCK_V] logits tiles (tl.dot over d in fp32) and keeps per row an online
  max ``m``, sum ``s = sum exp(z - m)`` and, for the entropy, ``a = sum exp(z - m) (z - m)``,
  plus the target logit. It writes these four [S, T] fp32 partials (10 MB at the shape above);
  the launcher merges the S splits. Accumulating ``(z - m)`` rather than ``z`` keeps the entropy
  free of cancellation: with |z| ~ 1e4, ``lse - sum p z`` would lose ~3 of fp32's 7 digits.
- Backward: ``dz = g (onehot(y) - p) - e p (log p + H)`` (g, e: upstream grads of logp and H),
  ``dh = (dz / temperature) @ W``; nothing for W (the LM head is frozen).
  ``_logprobs_bwd_dz_kernel`` recomputes the logits of a chunk of C rows tile by tile from the
  saved row max and log-sum (2 fp32 per token) and writes that chunk's dz ([C, V] in W's
  dtype); cuBLAS does dz @ W. In exchange the dh reduction over V is one deterministic GEMM,
  not atomics; a [BLOCK_T, d] dh accumulator on chip is impossible at d=4096.
  Cost model (estimates, not yet measured; T=16384, d=4096, V=151936, bf16, H200): each chunk
  reads the whole LM head twice (1.24 GB each: once in the dz kernel, once in the GEMM) for
  4*C*V*d FLOPs, an intensity against W of 2*C/elt FLOP/B, i.e. C in bf16. With C = 512
  (``dz_chunk_rows``) that is 32 chunks, 80 GB of W traffic (~17 ms at 4.8 TB/s) under 41
  TFLOP of math (~51 ms at ~800 TFLOP/s), plus the dz round trip 2 x T*V*2 = 10 GB (~2 ms).
  The former 64 MiB chunk (C = 128 rows) read 319 GB of W (~66 ms): memory-bound.

Forward program order (``_grouped_pid``): a 1-D grid walked in groups of GROUP_T = 16 T blocks,
T fastest inside a group, then the V splits, then the next group. With one T block per
program along a fast axis, the ~132 co-resident programs each streamed their own 512 KB h tile
per V block, a 66 MB working set (plus a 32 MB W slice) over the 50-60 MB L2: ~159 GB of h
traffic at T=16384, d=4096, V=151936 (estimate). In groups, the programs running together share
16 h tiles (8 MB, in L2 for the group's whole pass over V) and ~8 W tiles per step: h is read
from HBM about once, W once per group (16 x 1.24 GB = 20 GB, ~4 ms at 4.8 TB/s under ~25 ms of
math). 16 ~ sqrt(2 x 132) balances the two per step (h tiles are 64 rows, W tiles 128). The
order changes which program computes what, never how: results are the same bits in any order.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .naive import check_logprobs_inputs

# --- kernels ------------------------------------------------------------------------------


@triton.jit
def _grouped_pid(pid, n_t, n_s, GROUP_T: tl.constexpr):
    """(T block, V split) of program ``pid`` of an n_t * n_s grid, in groups of GROUP_T T blocks
    (the last group may be smaller): T block fastest inside a group, then the split."""
    per_group = GROUP_T * n_s
    first_t = (pid // per_group) * GROUP_T
    size = tl.minimum(n_t - first_t, GROUP_T)
    local = pid % per_group
    return first_t + local % size, local // size


@triton.jit
def _logprobs_fwd_kernel(
    h_ptr, w_ptr, y_ptr, m_ptr, s_ptr, a_ptr, zy_ptr,
    T, V, d, V_PER_SPLIT, n_splits, inv_temp,
    stride_h_t, stride_h_d, stride_w_v, stride_w_d,
    WITH_ENTROPY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUP_T: tl.constexpr,
):
    """Partial online-softmax statistics of rows [BLOCK_T] over vocabulary split ``pid_s``."""
    pid_t, pid_s = _grouped_pid(tl.program_id(0), tl.cdiv(T, BLOCK_T), n_splits, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    rows = offs_t.to(tl.int64)
    y = tl.load(y_ptr + offs_t, mask=mask_t, other=-1)

    # -1e30, not -inf: the first update computes (m_old - m_new) * s with s = 0, and
    # -inf * 0 would be nan.
    m = tl.full((BLOCK_T,), -1e30, tl.float32)
    s = tl.zeros((BLOCK_T,), tl.float32)
    a = tl.zeros((BLOCK_T,), tl.float32)
    zy = tl.zeros((BLOCK_T,), tl.float32)
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
        for k0 in range(0, d, BLOCK_D):
            offs_d = k0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < d
            h = tl.load(h_ptr + rows[:, None] * stride_h_t + offs_d[None, :] * stride_h_d,
                        mask=mask_t[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(w_ptr + offs_v.to(tl.int64)[None, :] * stride_w_v + offs_d[:, None] * stride_w_d,
                        mask=mask_d[:, None] & mask_v[None, :], other=0.0)
            # "ieee": fp32 inputs would otherwise run in tf32 (~1e-3 relative error); ignored
            # for fp16/bf16.
            acc += tl.dot(h, w, input_precision="ieee")
        z = acc * inv_temp
        m_new = tl.maximum(m, tl.max(tl.where(mask_v[None, :], z, float("-inf")), axis=1))
        alpha = tl.exp(m - m_new)
        # Columns past V get zc = 0 and e = 0 (not -inf and 0, whose product e * zc is nan).
        zc = tl.where(mask_v[None, :], z - m_new[:, None], 0.0)
        e = tl.where(mask_v[None, :], tl.exp(zc), 0.0)
        if WITH_ENTROPY:
            a = alpha * (a + (m - m_new) * s) + tl.sum(e * zc, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        zy += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new

    out = pid_s.to(tl.int64) * T + offs_t
    tl.store(m_ptr + out, m, mask=mask_t)
    tl.store(s_ptr + out, s, mask=mask_t)
    tl.store(zy_ptr + out, zy, mask=mask_t)
    if WITH_ENTROPY:
        tl.store(a_ptr + out, a, mask=mask_t)


@triton.jit
def _logprobs_bwd_dz_kernel(
    h_ptr, w_ptr, y_ptr, m_ptr, log_s_ptr, g_ptr, ent_ptr, ge_ptr, dz_ptr,
    T, V, d, inv_temp,
    stride_h_t, stride_h_d, stride_w_v, stride_w_d, stride_dz_t, stride_dz_v,
    WITH_ENTROPY_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dz[t, v] = (g_t (1[v = y_t] - p_tv) - e_t p_tv (log p_tv + H_t)) / temperature for one tile."""
    pid_t = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_t = offs_t < T
    mask_v = offs_v < V
    rows = offs_t.to(tl.int64)
    cols = offs_v.to(tl.int64)

    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for k0 in range(0, d, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        h = tl.load(h_ptr + rows[:, None] * stride_h_t + offs_d[None, :] * stride_h_d,
                    mask=mask_t[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_w_v + offs_d[:, None] * stride_w_d,
                    mask=mask_d[:, None] & mask_v[None, :], other=0.0)
        acc += tl.dot(h, w, input_precision="ieee")

    y = tl.load(y_ptr + offs_t, mask=mask_t, other=-1)
    m = tl.load(m_ptr + offs_t, mask=mask_t, other=0.0)
    log_s = tl.load(log_s_ptr + offs_t, mask=mask_t, other=0.0)
    g = tl.load(g_ptr + offs_t, mask=mask_t, other=0.0)
    # (z - m) - log s, not z - lse: with z ~ 1e4 the fp32 lse carries an absolute error of
    # ~5e-4 that would become a 5e-4 relative error in p; z - m is exact when z is near m.
    logp = (acc * inv_temp - m[:, None]) - log_s[:, None]
    p = tl.exp(logp)
    dz = tl.where(offs_v[None, :] == y[:, None], g[:, None], 0.0) - g[:, None] * p
    if WITH_ENTROPY_GRAD:
        ent = tl.load(ent_ptr + offs_t, mask=mask_t, other=0.0)
        ge = tl.load(ge_ptr + offs_t, mask=mask_t, other=0.0)
        dz -= ge[:, None] * p * (logp + ent[:, None])
    dz = dz * inv_temp
    tl.store(dz_ptr + rows[:, None] * stride_dz_t + cols[None, :] * stride_dz_v,
             dz.to(dz_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_v[None, :])


# --- host launchers -----------------------------------------------------------------------

# Rows per backward chunk (``dz_chunk_rows``). A chunk's intensity against the LM head is
# 2*C/elt FLOP/B (module docstring); dense bf16 turns compute-bound at 989 TFLOP/s over
# 3.35 TB/s = 295 FLOP/B on an H100 SXM, 206 on an H200 (4.8 TB/s). 512 rows give 512 FLOP/B,
# 1.7x / 2.5x those: the W re-reads hide under the math with room for the dz round trip
# (elt*balance/(2*d) = 7% of the math time at d=4096). dz is then 155 MB at V=151936 in bf16:
# with the 10 MB of forward partials, 1.6% of the 10 GB of fp32 logits the naive path holds.
_DZ_MIN_ROWS = 512
# Where 512 rows cost less, chunks grow until dz reaches this (fewer, larger launches: 2,176
# rows at V=32000 in bf16). At huge V the minimum wins: 512 rows of V=2^20 are 1 GiB, 1/64 of
# T=16384 rows of fp32 logits, and fewer rows would make the chunk memory-bound again.
_DZ_BYTES = 128 * 2**20


def dz_chunk_rows(T: int, V: int, elt: int, block_t: int, min_rows: int = _DZ_MIN_ROWS,
                  max_bytes: int = _DZ_BYTES) -> int:
    """Rows C per backward chunk: the most rows whose [C, V] dz of ``elt``-byte elements fits
    ``max_bytes``, but at least ``min_rows``; rounded up (never down) to a multiple of
    ``block_t`` so no dz tile runs part-empty inside a chunk; at most T (one chunk)."""
    if min(T, V, elt, block_t, min_rows) < 1:
        raise ValueError(f"dz_chunk_rows needs T, V, elt, block_t, min_rows >= 1, got "
                         f"{(T, V, elt, block_t, min_rows)}")
    rows = max(min_rows, max_bytes // (V * elt))
    return min(triton.cdiv(rows, block_t) * block_t, T)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(dtype: torch.dtype, T: int, V: int, device: torch.device, backward: bool) -> dict:
    """Tile sizes. The interpreter gets tiny tiles so that test shapes (T=63, V=200) cross
    several T blocks, V blocks, V splits and backward chunks.

    GPU tiles were chosen from ptxas register reports (sm_80 and sm_90, triton 3.9): the
    forward carries four running row statistics next to its logits tile, and 128x128 tiles
    spill (68-240 bytes per thread) where 64x128 on 8 warps uses 223-252 registers without
    spilling; the backward is a plain GEMM + elementwise epilogue and fits 128x128 unspilled.
    fp32 runs the "ieee" dot on FMA units, so it gets smaller tiles.
    """
    if _interpreting():
        return dict(BLOCK_T=16, BLOCK_V=32, BLOCK_D=16, num_warps=4, num_stages=1,
                    v_per_split=64, dz_min_rows=32, dz_bytes=0, GROUP_T=3)
    if dtype == torch.float32:
        cfg = (dict(BLOCK_T=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2) if backward
               else dict(BLOCK_T=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2))
    else:
        cfg = (dict(BLOCK_T=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3) if backward
               else dict(BLOCK_T=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3))
    # Enough V splits for ~2 programs per SM, each split at most 32 V blocks (32 MiB of W at
    # d=4096 in bf16 with BLOCK_V=128): 38 splits at V=151936, 10 MB of partials at T=16384.
    n_t = triton.cdiv(T, cfg["BLOCK_T"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want_splits = triton.cdiv(2 * sms, n_t)
    per_split = triton.cdiv(triton.cdiv(V, want_splits), cfg["BLOCK_V"]) * cfg["BLOCK_V"]
    cfg["v_per_split"] = max(cfg["BLOCK_V"], min(32 * cfg["BLOCK_V"], per_split))
    cfg.update(dz_min_rows=_DZ_MIN_ROWS, dz_bytes=_DZ_BYTES, GROUP_T=16)
    return cfg


def _logprobs_fwd(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, temperature: float,
                  with_entropy: bool):
    """h [T, d], w [V, d], y [T] (contiguous) -> logp, row max m, log sum exp(z - m), entropy
    or None; all [T] fp32 (lse = m + log_s, kept apart for precision)."""
    T, d = h.shape
    V = w.shape[0]
    cfg = _config(h.dtype, T, V, h.device, backward=False)
    S = triton.cdiv(V, cfg["v_per_split"])
    part = torch.empty((4, S, T), device=h.device, dtype=torch.float32)
    m, s, a, zy = part[0], part[1], part[2], part[3]
    grid = (triton.cdiv(T, cfg["BLOCK_T"]) * S,)
    _logprobs_fwd_kernel[grid](
        h, w, y, m, s, a, zy, T, V, d, cfg["v_per_split"], S, 1.0 / temperature,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        WITH_ENTROPY=with_entropy, BLOCK_T=cfg["BLOCK_T"], BLOCK_V=cfg["BLOCK_V"],
        BLOCK_D=cfg["BLOCK_D"], GROUP_T=cfg["GROUP_T"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    # Merge the S splits: O(S*T) elementwise work, negligible next to the kernel's O(T*V*d).
    m_max = m.max(dim=0).values
    scale = torch.exp(m - m_max)
    s_tot = (s * scale).sum(dim=0)
    log_s = torch.log(s_tot)
    # (z_y - m) - log s rather than z_y - lse: exact subtraction of two nearby numbers; with
    # logits ~1e4, z_y - lse in fp32 would lose ~4 of the ~7 significant digits of logp.
    logp = (zy.sum(dim=0) - m_max) - log_s
    entropy = None
    if with_entropy:
        a_tot = (scale * (a + (m - m_max) * s)).sum(dim=0)
        entropy = log_s - a_tot / s_tot
    return logp, m_max, log_s, entropy


def _dz_chunk(h, w, y, m, log_s, g, entropy, ge, inv_temp, t0, t1, dz, cfg):
    """dz[:t1 - t0] of rows t0:t1 (``_logprobs_bwd_dz_kernel``); each row depends on its own
    inputs only, so the result is the same bits whatever the chunking."""
    n, d = t1 - t0, h.shape[1]
    V = w.shape[0]
    hc = h[t0:t1]
    with_ent = ge is not None
    grid = (triton.cdiv(n, cfg["BLOCK_T"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _logprobs_bwd_dz_kernel[grid](
        hc, w, y[t0:t1], m[t0:t1], log_s[t0:t1], g[t0:t1],
        entropy[t0:t1] if with_ent else g[t0:t1], ge[t0:t1] if with_ent else g[t0:t1], dz,
        n, V, d, inv_temp,
        hc.stride(0), hc.stride(1), w.stride(0), w.stride(1), dz.stride(0), dz.stride(1),
        WITH_ENTROPY_GRAD=with_ent, BLOCK_T=cfg["BLOCK_T"], BLOCK_V=cfg["BLOCK_V"],
        BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _logprobs_bwd(h, w, y, m, log_s, g, entropy, ge, temperature):
    """dh [T, d] in h's dtype from dlogp ``g`` [T] and (optional) dentropy ``ge`` [T]."""
    T, d = h.shape
    V = w.shape[0]
    cfg = _config(h.dtype, T, V, h.device, backward=True)
    dh = torch.empty((T, d), device=h.device, dtype=h.dtype)
    C = dz_chunk_rows(T, V, w.element_size(), cfg["BLOCK_T"], cfg["dz_min_rows"], cfg["dz_bytes"])
    dz = torch.empty((C, V), device=h.device, dtype=w.dtype)
    for t0 in range(0, T, C):
        t1 = min(t0 + C, T)
        _dz_chunk(h, w, y, m, log_s, g, entropy, ge, 1.0 / temperature, t0, t1, dz, cfg)
        torch.mm(dz[:t1 - t0], w, out=dh[t0:t1])
    return dh


# --- custom ops and autograd ------------------------------------------------------------------
# torch.library ops with fake implementations: torch.compile traces through them without a graph
# break and CUDA graphs can capture them. Upstream grads arrive materialised (zeros for an unused
# output): an unused entropy costs one more multiply-add per dz element, nothing per GEMM.

@torch.library.custom_op("lora_engine::token_logprobs", mutates_args=())
def _token_logprobs_op(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, temperature: float,
                       with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy or [0], row max m, log s), [T] fp32 each; m and log s are for the backward."""
    logp, m, log_s, entropy = _logprobs_fwd(h, w, y, temperature, with_entropy)
    return logp, (entropy if with_entropy else logp.new_empty(0)), m, log_s


@_token_logprobs_op.register_fake
def _(h, w, y, temperature, with_entropy):
    T = h.shape[0]
    f32 = lambda n: h.new_empty((n,), dtype=torch.float32)
    return f32(T), f32(T if with_entropy else 0), f32(T), f32(T)


@torch.library.custom_op("lora_engine::token_logprobs_backward", mutates_args=())
def _token_logprobs_bwd_op(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, m: torch.Tensor,
                           log_s: torch.Tensor, g: torch.Tensor, entropy: Optional[torch.Tensor],
                           ge: Optional[torch.Tensor], temperature: float) -> torch.Tensor:
    return _logprobs_bwd(h, w, y, m, log_s, g, entropy, ge, temperature)


@_token_logprobs_bwd_op.register_fake
def _(h, w, y, m, log_s, g, entropy, ge, temperature):
    return torch.empty_like(h)


def _setup(ctx, inputs, output):
    h, w, y, temperature, with_entropy = inputs
    logp, entropy, m, log_s = output
    ctx.save_for_backward(h, w, y, m, log_s, entropy)
    ctx.temperature, ctx.with_entropy = temperature, with_entropy


def _backward(ctx, g_logp, g_entropy, g_m, g_log_s):
    h, w, y, m, log_s, entropy = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    # Upstream grads are often expanded views (stride 0, from .sum()); the kernel needs stride 1.
    g = g_logp.float().contiguous()
    ge = g_entropy.float().contiguous() if ctx.with_entropy else None
    dh = _token_logprobs_bwd_op(h, w, y, m, log_s, g, entropy if ctx.with_entropy else None, ge, ctx.temperature)
    return dh, None, None, None, None


_token_logprobs_op.register_autograd(_backward, setup_context=_setup)


# --- public function ----------------------------------------------------------------------


def token_logprobs_triton(hidden, lm_head_weight, targets, temperature=1.0, return_entropy=False):
    """Per-token log-prob of ``targets`` (and entropy) under ``hidden @ W^T / temperature``,
    without materialising the [T, V] logits (the custom op ``torch.ops.lora_engine.token_logprobs``).

    Args:
        hidden: [*, d] fp16/bf16/fp32 final hidden states (any strides).
        lm_head_weight: [V, d], same dtype and device as ``hidden``; frozen: it must not require
            grad (this op computes dh only; pass ``lm_head_weight.detach()``).
        targets: [*] integer token ids in [0, V), the shape of ``hidden`` minus the last dim.
        temperature: float > 0; divides the logits (TRL's ``selective_log_softmax`` semantics).
        return_entropy: also return the softmax entropy (differentiable too).

    Returns:
        ``logp`` [*] fp32, or ``(logp, entropy)`` ([*] fp32 each) when ``return_entropy``.
        Backward gives ``d hidden`` ([*, d], hidden's dtype) through both outputs.

    Raises:
        ValueError: shape, dtype or device mismatch, float64 inputs (use the naive path),
            temperature <= 0, targets out of range, or an LM head that requires grad.
    """
    lead, d, V = check_logprobs_inputs(hidden, lm_head_weight, targets, temperature, triton=True)
    h = hidden.reshape(-1, d)
    y = targets.reshape(-1).contiguous()
    if h.shape[0] == 0:
        zeros = hidden.sum(dim=-1).float() * 0.0
        return (zeros, zeros.clone()) if return_entropy else zeros
    logp, entropy, _, _ = _token_logprobs_op(h, lm_head_weight, y, float(temperature), bool(return_entropy))
    logp = logp.reshape(lead)
    return (logp, entropy.reshape(lead)) if return_entropy else logp
