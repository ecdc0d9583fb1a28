"""Fused clipped-surrogate policy loss + k3 KL in Triton, aggregated per adapter, fwd + bwd.

The objective is the one in ``naive.py`` (TRL's GRPOTrainer loss on each adapter's sequences).
Three kernels, no atomics, so losses and gradients are deterministic:

- ``_policy_rows_kernel``, grid (B,): one program per sequence walks its L tokens (twice at
  sequence level: the GSPO ratio needs the row's summed log-ratio first) and writes 8 fp32 row
  statistics: sum(mask * loss_tok), sum(mask), sum(mask * log_ratio), the clip counts, sum of
  mask * kl and of mask * ratio.
- ``_policy_reduce_kernel``, grid (A,): one program per adapter sums its rows and applies the
  loss type's normaliser (sequences, tokens, or sequences * max_completion_length); it also
  keeps the adapter's sequence and token counts for the backward.
- ``_policy_bwd_kernel``, grid (B,): d loss_a / d logp[b, l] from the row's normaliser and
  the per-token derivative, with PyTorch's autograd conventions at the kinks so that the
  gradient equals the reference's exactly on clip boundaries: clamp passes the gradient at
  its bounds (inclusive), ``min(u, c)`` splits it half-half on ties (inside the clip range
  ``r2 == r``, so every unclipped token is a tie).

Memory traffic is 4-5 reads of [B, L] and one write; nothing [B, L] is stored for backward
beyond the inputs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .naive import LOSS_TYPES, METRIC_NAMES, check_policy_loss_inputs

# --- kernels ------------------------------------------------------------------------------


@triton.jit
def _k3(d):
    """k3 KL ``exp(d) - d - 1`` without the cancellation near d = 0: an fp32 exp is off by about
    1e-7 absolute (numpy's, the interpreter's, by a few ulp), the result is ~d^2 / 2, so the
    direct form loses 1e-5 relative at d = 0.1. On |d| < 0.5 the degree-9 Taylor polynomial
    (next term < 3e-9 relative) is accurate to a few ulp; outside, the direct form is fine."""
    p = 1.0 / 362880.0
    p = p * d + 1.0 / 40320.0
    p = p * d + 1.0 / 5040.0
    p = p * d + 1.0 / 720.0
    p = p * d + 1.0 / 120.0
    p = p * d + 1.0 / 24.0
    p = p * d + 1.0 / 6.0
    p = p * d + 0.5
    return tl.where(tl.abs(d) < 0.5, d * d * p, tl.exp(d) - d - 1.0)


@triton.jit
def _policy_rows_kernel(
    logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_ptr, rows_ptr,
    L, lo, hi, delta, beta,
    SEQ_LEVEL: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_KL: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Row statistics of sequence ``b`` (inputs contiguous [B, L]) into rows[b, 0:8]:
    sum mask*loss_tok, sum mask, sum mask*log_ratio (sequence level only), clip-low,
    clip-high and clip-region token counts, sum mask*kl, sum mask*ratio."""
    b = tl.program_id(0)
    base = b.to(tl.int64) * L
    adv = tl.load(adv_ptr + b).to(tl.float32)

    acc_lr = tl.zeros((BLOCK_L,), tl.float32)
    acc_m = tl.zeros((BLOCK_L,), tl.float32)
    if SEQ_LEVEL:
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            ml = offs < L
            mk = tl.load(mask_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            lp = tl.load(logp_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            acc_lr += tl.where(mk != 0, lp - old, 0.0) * mk
            acc_m += mk
    lrsum = tl.sum(acc_lr, axis=0)
    r_seq = tl.exp(lrsum / tl.maximum(tl.sum(acc_m, axis=0), 1.0))

    # A block, not a scalar: the interpreter cannot `&` a block of bools with a scalar bool.
    adv_l = tl.zeros((BLOCK_L,), tl.float32) + adv
    acc_loss = tl.zeros((BLOCK_L,), tl.float32)
    acc_msum = tl.zeros((BLOCK_L,), tl.float32)
    acc_low = tl.zeros((BLOCK_L,), tl.float32)
    acc_high = tl.zeros((BLOCK_L,), tl.float32)
    acc_region = tl.zeros((BLOCK_L,), tl.float32)
    acc_kl = tl.zeros((BLOCK_L,), tl.float32)
    acc_ratio = tl.zeros((BLOCK_L,), tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs = l0 + tl.arange(0, BLOCK_L)
        ml = offs < L
        mk = tl.load(mask_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
        lp = tl.load(logp_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
        on = mk != 0
        if SEQ_LEVEL:
            r = tl.zeros((BLOCK_L,), tl.float32) + r_seq
        else:
            old = tl.load(old_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            r = tl.exp(tl.where(on, lp - old, 0.0))
        c2 = tl.minimum(tl.maximum(r, lo), hi)
        if HAS_DELTA:
            c1 = tl.minimum(r, delta)
        else:
            c1 = r
        pt = -tl.minimum(c1 * adv, c2 * adv)
        if HAS_REF:
            ref = tl.load(ref_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            dref = tl.where(on, ref - lp, 0.0)
            kl = _k3(dref)
            acc_kl += mk * kl
            if HAS_KL:
                pt += beta * kl
        acc_loss += mk * pt
        acc_msum += mk
        low = (c1 < lo) & (adv_l < 0)
        high = (c1 > hi) & (adv_l > 0)
        acc_low += tl.where(low, mk, 0.0)
        acc_high += tl.where(high, mk, 0.0)
        acc_region += tl.where(low | high, mk, 0.0)
        acc_ratio += mk * r

    out = rows_ptr + b.to(tl.int64) * 8
    tl.store(out + 0, tl.sum(acc_loss, axis=0))
    tl.store(out + 1, tl.sum(acc_msum, axis=0))
    tl.store(out + 2, lrsum)
    tl.store(out + 3, tl.sum(acc_low, axis=0))
    tl.store(out + 4, tl.sum(acc_high, axis=0))
    tl.store(out + 5, tl.sum(acc_region, axis=0))
    tl.store(out + 6, tl.sum(acc_kl, axis=0))
    tl.store(out + 7, tl.sum(acc_ratio, axis=0))


@triton.jit
def _policy_reduce_kernel(
    ids_ptr, rows_ptr, loss_ptr, met_ptr, cnt_ptr, B, A, Lc,
    LOSS_TYPE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """losses[a], metrics[:, a], counts (sequences, tokens) of adapter ``a`` from its rows.
    ``Lc`` (fp32) is dr_grpo's length normaliser, max_completion_length, not the batch width."""
    a = tl.program_id(0)
    n_seq = tl.zeros((BLOCK_B,), tl.float32)
    n_tok = tl.zeros((BLOCK_B,), tl.float32)
    num = tl.zeros((BLOCK_B,), tl.float32)
    num_seq = tl.zeros((BLOCK_B,), tl.float32)
    low = tl.zeros((BLOCK_B,), tl.float32)
    high = tl.zeros((BLOCK_B,), tl.float32)
    region = tl.zeros((BLOCK_B,), tl.float32)
    kl = tl.zeros((BLOCK_B,), tl.float32)
    ratio = tl.zeros((BLOCK_B,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs = b0 + tl.arange(0, BLOCK_B)
        ids = tl.load(ids_ptr + offs, mask=offs < B, other=-1)
        sel = ids == a
        row = rows_ptr + offs.to(tl.int64) * 8
        loss = tl.load(row + 0, mask=sel, other=0.0)
        msum = tl.load(row + 1, mask=sel, other=0.0)
        n_seq += sel.to(tl.float32)
        n_tok += msum
        num += loss
        num_seq += loss / tl.maximum(msum, 1.0)
        low += tl.load(row + 3, mask=sel, other=0.0)
        high += tl.load(row + 4, mask=sel, other=0.0)
        region += tl.load(row + 5, mask=sel, other=0.0)
        kl += tl.load(row + 6, mask=sel, other=0.0)
        ratio += tl.load(row + 7, mask=sel, other=0.0)
    n = tl.sum(n_seq, axis=0)
    tok = tl.sum(n_tok, axis=0)
    tok_div = tl.maximum(tok, 1.0)
    if LOSS_TYPE == 0:
        total = tl.sum(num_seq, axis=0) / tl.maximum(n, 1.0)
    elif LOSS_TYPE == 2:
        total = tl.sum(num, axis=0) / tl.maximum(n * Lc, 1.0)
    else:
        total = tl.sum(num, axis=0) / tok_div
    tl.store(loss_ptr + a, total)
    tl.store(met_ptr + 0 * A + a, tl.sum(low, axis=0) / tok_div)
    tl.store(met_ptr + 1 * A + a, tl.sum(high, axis=0) / tok_div)
    tl.store(met_ptr + 2 * A + a, tl.sum(region, axis=0) / tok_div)
    tl.store(met_ptr + 3 * A + a, tl.sum(kl, axis=0) / tok_div)
    tl.store(met_ptr + 4 * A + a, tl.sum(ratio, axis=0) / tok_div)
    tl.store(cnt_ptr + a, n)
    tl.store(cnt_ptr + A + a, tok)


@triton.jit
def _surrogate_grad(r, adv, lo, hi, delta, HAS_DELTA: tl.constexpr):
    """d/dw of -min(r1 A, r2 A) with r = exp(w), using autograd's clamp/min conventions."""
    c2 = tl.minimum(tl.maximum(r, lo), hi)
    if HAS_DELTA:
        c1 = tl.minimum(r, delta)
        du = tl.where(r <= delta, adv * r, 0.0)
    else:
        c1 = r
        du = adv * r
    dc = tl.where((r >= lo) & (r <= hi), adv * r, 0.0)
    u = c1 * adv
    c = c2 * adv
    return -tl.where(u < c, du, tl.where(u > c, dc, 0.5 * (du + dc)))


@triton.jit
def _policy_bwd_kernel(
    logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_ptr, ids_ptr, rows_ptr, cnt_ptr, gloss_ptr, dlogp_ptr,
    L, A, Lc, lo, hi, delta, beta,
    LOSS_TYPE: tl.constexpr, SEQ_LEVEL: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_KL: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dlogp[b, :] = d(sum_a g_a loss_a) / d logp[b, :]."""
    b = tl.program_id(0)
    base = b.to(tl.int64) * L
    a = tl.load(ids_ptr + b)
    g = tl.load(gloss_ptr + a)
    n = tl.load(cnt_ptr + a)
    tok = tl.load(cnt_ptr + A + a)
    msum = tl.load(rows_ptr + b.to(tl.int64) * 8 + 1)
    adv = tl.load(adv_ptr + b).to(tl.float32)
    if LOSS_TYPE == 0:
        w_row = g / (tl.maximum(msum, 1.0) * tl.maximum(n, 1.0))
    elif LOSS_TYPE == 2:
        w_row = g / tl.maximum(n * Lc, 1.0)
    else:
        w_row = g / tl.maximum(tok, 1.0)

    seq_coef = 0.0
    if SEQ_LEVEL:
        # rowsum = msum * pg(s) + ..., s = sum_l mask_l log_ratio_l / max(msum, 1)
        lrsum = tl.load(rows_ptr + b.to(tl.int64) * 8 + 2)
        r_seq = tl.exp(lrsum / tl.maximum(msum, 1.0))
        seq_coef = _surrogate_grad(r_seq, adv, lo, hi, delta, HAS_DELTA) * msum / tl.maximum(msum, 1.0)

    for l0 in range(0, L, BLOCK_L):
        offs = l0 + tl.arange(0, BLOCK_L)
        ml = offs < L
        mk = tl.load(mask_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
        lp = tl.load(logp_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
        on = mk != 0
        if SEQ_LEVEL:
            d = mk * seq_coef
        else:
            old = tl.load(old_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            r = tl.exp(tl.where(on, lp - old, 0.0))
            d = mk * _surrogate_grad(r, adv, lo, hi, delta, HAS_DELTA)
        if HAS_KL:
            ref = tl.load(ref_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            dref = tl.where(on, ref - lp, 0.0)
            d += mk * beta * (1.0 - tl.exp(dref))
        tl.store(dlogp_ptr + base + offs, (w_row * d).to(dlogp_ptr.dtype.element_ty), mask=ml)


# --- host launchers -----------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(B: int, L: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_B); tiny in the interpreter so test shapes cross several blocks."""
    if _interpreting():
        return 16, 4
    return min(triton.next_power_of_2(max(L, 1)), 1024), min(triton.next_power_of_2(max(B, 1)), 1024)


def _policy_fwd(logp, old, ref, mask, adv, ids, A, cfg):
    B, L = logp.shape
    BLOCK_L, BLOCK_B = _blocks(B, L)
    rows = torch.empty((B, 8), device=logp.device, dtype=torch.float32)
    _policy_rows_kernel[(B,)](
        logp, old, ref if ref is not None else logp, mask, adv, rows,
        L, cfg["lo"], cfg["hi"], cfg["delta"], cfg["beta"],
        SEQ_LEVEL=cfg["seq"], HAS_DELTA=cfg["has_delta"], HAS_REF=ref is not None,
        HAS_KL=cfg["has_kl"], BLOCK_L=BLOCK_L, num_warps=4,
    )
    losses = torch.empty((A,), device=logp.device, dtype=torch.float32)
    metrics = torch.empty((len(METRIC_NAMES), A), device=logp.device, dtype=torch.float32)
    counts = torch.empty((2, A), device=logp.device, dtype=torch.float32)
    _policy_reduce_kernel[(A,)](ids, rows, losses, metrics, counts, B, A, cfg["Lc"],
                                LOSS_TYPE=cfg["loss_type"], BLOCK_B=BLOCK_B, num_warps=4)
    return losses, metrics, rows, counts


def _policy_bwd(logp, old, ref, mask, adv, ids, rows, counts, g_losses, cfg):
    B, L = logp.shape
    A = counts.shape[1]
    BLOCK_L, _ = _blocks(B, L)
    dlogp = torch.empty_like(logp)
    _policy_bwd_kernel[(B,)](
        logp, old, ref if ref is not None else logp, mask, adv, ids, rows, counts, g_losses, dlogp,
        L, A, cfg["Lc"], cfg["lo"], cfg["hi"], cfg["delta"], cfg["beta"],
        LOSS_TYPE=cfg["loss_type"], SEQ_LEVEL=cfg["seq"], HAS_DELTA=cfg["has_delta"],
        HAS_KL=cfg["has_kl"], BLOCK_L=BLOCK_L, num_warps=4,
    )
    return dlogp


# --- autograd -----------------------------------------------------------------------------


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, mask, adv, ids, A, cfg):
        losses, metrics, rows, counts = _policy_fwd(logp, old, ref, mask, adv, ids, A, cfg)
        ctx.save_for_backward(logp, old, ref, mask, adv, ids, rows, counts)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(metrics)
        return losses, metrics

    @staticmethod
    def backward(ctx, g_losses, g_metrics):
        logp, old, ref, mask, adv, ids, rows, counts = ctx.saved_tensors
        # Upstream grads of losses.sum() arrive as a stride-0 expanded view; the kernel indexes them.
        g = g_losses.float().contiguous()
        dlogp = _policy_bwd(logp, old, ref, mask, adv, ids, rows, counts, g, ctx.cfg)
        return dlogp, None, None, None, None, None, None, None


# --- public function ----------------------------------------------------------------------


def policy_loss_triton(logp, old_logp, advantages, mask, adapter_ids, ref_logp=None,
                       loss_type="dapo", eps_low=0.2, eps_high=0.2, delta=None, beta=0.0,
                       importance_level="token", num_adapters=None, max_completion_length=None):
    """Clipped surrogate + k3 KL per adapter (TRL's GRPO loss family), fused, fwd + bwd.

    Args:
        logp: [B, L] fp16/bf16/fp32, current-policy per-token log-probs (differentiable).
        old_logp: [B, L] float, behaviour-policy log-probs (constant).
        advantages: [B] float, one per sequence (constant).
        mask: [B, L] bool/int/float completion mask (float values act as token weights).
        adapter_ids: [B] int in [0, num_adapters), the adapter of each sequence.
        ref_logp: [B, L] float reference log-probs, or None (then beta must be 0).
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" (TRL's definitions, per adapter).
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] for the ratio.
        delta: upper bound on the unclipped ratio (TRL's two-sided clipping), or None.
        beta: coefficient of the k3 KL to the reference.
        importance_level: "token" or "sequence" (GSPO: exp of the mean masked log-ratio).
        num_adapters: A; None means ``adapter_ids.max() + 1`` (one host sync).
        max_completion_length: int >= L, dr_grpo's length normaliser (TRL's
            ``max_completion_length``): pass your generation cap. None means the padded width
            L, which makes dr_grpo depend on the batch's longest completion (another adapter's
            included). Other loss types ignore it (beyond validation).

    Returns:
        ``(losses, metrics)``: ``losses`` [A] fp32 (differentiable w.r.t. ``logp``; sum them:
        adapters are independent), ``metrics`` a dict of [A] fp32 tensors ``clip_frac_low``,
        ``clip_frac_high``, ``clip_frac``, ``kl_mean``, ``ratio_mean``. An adapter without
        tokens gets loss 0 and metrics 0. The gradient has ``logp``'s dtype.

    Raises:
        ValueError: shape/dtype/device mismatches, unknown ``loss_type`` or
            ``importance_level``, ``beta != 0`` without ``ref_logp``, adapter ids out of range,
            ``max_completion_length`` not an int >= 1 or smaller than L.
    """
    B, L, A, Lc = check_policy_loss_inputs(logp, old_logp, advantages, mask, adapter_ids, ref_logp,
                                           loss_type, eps_low, eps_high, delta, beta,
                                           importance_level, num_adapters, triton=True,
                                           max_completion_length=max_completion_length)
    if B == 0 or A == 0:
        zeros = logp.sum() * 0.0 + logp.new_zeros((A,), dtype=torch.float32)
        return zeros, {k: torch.zeros((A,), device=logp.device) for k in METRIC_NAMES}
    cfg = dict(lo=1.0 - eps_low, hi=1.0 + eps_high, delta=float(delta) if delta is not None else 0.0,
               has_delta=delta is not None, beta=float(beta),
               has_kl=beta != 0, seq=importance_level == "sequence", loss_type=LOSS_TYPES[loss_type],
               Lc=float(Lc))  # a float: n * Lc in fp32, and no int specialisation / overflow
    mask_f = mask if mask.dtype == torch.float32 else mask.to(torch.float32)
    losses, metrics = _PolicyLoss.apply(
        logp.contiguous(), old_logp.contiguous(), ref_logp.contiguous() if ref_logp is not None else None,
        mask_f.contiguous(), advantages.contiguous(), adapter_ids.contiguous(), A, cfg)
    return losses, {k: metrics[i] for i, k in enumerate(METRIC_NAMES)}
