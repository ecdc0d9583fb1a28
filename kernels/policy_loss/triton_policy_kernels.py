"""The ``@triton.jit`` kernels of the fused policy loss (launchers in ``triton_policy_loss.py``).

Constexpr codes, from ``loss_types``: SURROGATE 0 clip, 1 cispo, 2 sapo, 3 vespo (index in
``SURROGATES``); NORM 0 sequence_mean, 1 sequences, 2 sequences_x_length, 3 tokens (index in
``NORMALISERS``). Rows hold ``NSTAT`` fp32 statistics per sequence (slots below).
"""
from __future__ import annotations

import triton
import triton.language as tl

NSTAT = 10
# rows[b, :]: 0 sum mask*loss_tok, 1 sum mask, 2 sum mask*log_ratio, 3/4/5 clip-low/high/region
# token counts, 6 sum mask*kl (corrected with KL_CORR: the metric), 7 sum mask*ratio,
# 8 sum mask*k3 (uncorrected: the sequence-level corrected backward needs it), 9 vespo's phi_b.


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
def _sigmoid(x):
    # 1 / (1 + e^-x): exp overflows to inf for x < -88 and the result is 0, not nan
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _vespo_phi(lrc_sum, adv, k_pos, lam_pos, k_neg, lam_neg):
    """phi = exp(lam + k log W - lam W), log W = clamp(lrc_sum, log 1e-8, 20), nan/inf -> 0.
    In fp64 (``lrc_sum`` is fp64): phi's relative error is |k - lam W| times log W's absolute
    one, and an fp32 sum of ~1,000 log-ratios is off by ~1e-6 (fp32 PyTorch: 6e-7 to 1.2e-6
    relative RMS at B=64, L=1500, over TOL). Per row, so the fp64 cost is nil."""
    log_w = tl.minimum(tl.maximum(lrc_sum, -18.420680743952367), 20.0)
    nonneg = adv >= 0
    k = tl.where(nonneg, k_pos, k_neg).to(tl.float64)
    lam = tl.maximum(tl.where(nonneg, lam_pos, lam_neg), 1e-4).to(tl.float64)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w)).to(tl.float32)
    # TRL's nan_to_num(nan=0, posinf=0), in fp32 as TRL runs: nan fails both tests, inf the second
    return tl.where((phi == phi) & (phi <= 3.4028234663852886e38), phi, 0.0)


@triton.jit
def _dsurrogate_dw(r, adv, lo, hi, delta, t_pos, t_neg, SURROGATE: tl.constexpr, HAS_DELTA: tl.constexpr):
    """d loss_tok / dw, r = exp(w), for the surrogates that depend on w (clip, sapo).
    Clip uses autograd's conventions at the kinks so that the gradient equals the reference's
    exactly on clip boundaries: clamp passes the gradient at its bounds (inclusive), ``min(u, c)``
    splits it half-half on ties (inside the clip range ``r2 == r``, so every unclipped token is
    a tie). Sapo: d/dr [sigmoid(tau (r - 1)) 4 / tau] = 4 s(x) s(-x), both factors computed
    directly (1 - s(x) cancels for x > 17 in fp32)."""
    if SURROGATE == 2:
        x = tl.where(adv > 0, t_pos, t_neg) * (r - 1.0)
        return -adv * 4.0 * _sigmoid(x) * _sigmoid(-x) * r
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
def _policy_rows_kernel(
    logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_ptr, rows_ptr,
    L, lo, hi, cap, delta, beta, t_pos, t_neg, k_pos, lam_pos, k_neg, lam_neg,
    SURROGATE: tl.constexpr, SEQ_LEVEL: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_KL: tl.constexpr, KL_CORR: tl.constexpr, TOKEN_ADV: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Row statistics of sequence ``b`` (inputs contiguous [B, L]) into rows[b, 0:NSTAT].
    ``TOKEN_ADV``: advantages are [B, L] (token level only, never with SEQ_LEVEL or vespo)."""
    b = tl.program_id(0)
    base = b.to(tl.int64) * L
    if TOKEN_ADV:
        adv = 0.0  # unused: every use below reads the per-token adv_t
    else:
        adv = tl.load(adv_ptr + b).to(tl.float32)

    # A first pass over the row when the ratio (GSPO) or phi (VESPO) is a per-row quantity.
    acc_lr = tl.zeros((BLOCK_L,), tl.float32)
    acc_lrc = tl.zeros((BLOCK_L,), tl.float64)  # vespo's summed log-ratio: fp64, see _vespo_phi
    acc_m = tl.zeros((BLOCK_L,), tl.float32)
    if SEQ_LEVEL or SURROGATE == 3:
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            ml = offs < L
            mk = tl.load(mask_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            lp = tl.load(logp_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            lr = tl.where(mk != 0, lp - old, 0.0)
            acc_lr += lr * mk
            acc_m += mk
            if SURROGATE == 3:
                # the difference of two fp32 values is exact in fp64
                lr64 = tl.where(mk != 0, lp.to(tl.float64) - old.to(tl.float64), 0.0)
                acc_lrc += tl.minimum(tl.maximum(lr64, -20.0), 20.0) * mk.to(tl.float64)
    lrsum = tl.sum(acc_lr, axis=0)
    r_seq = tl.exp(lrsum / tl.maximum(tl.sum(acc_m, axis=0), 1.0))
    phi = _vespo_phi(tl.sum(acc_lrc, axis=0), adv, k_pos, lam_pos, k_neg, lam_neg)

    # A block, not a scalar: the interpreter cannot `&` a block of bools with a scalar bool.
    adv_l = tl.zeros((BLOCK_L,), tl.float32) + adv
    acc_loss = tl.zeros((BLOCK_L,), tl.float32)
    acc_msum = tl.zeros((BLOCK_L,), tl.float32)
    acc_low = tl.zeros((BLOCK_L,), tl.float32)
    acc_high = tl.zeros((BLOCK_L,), tl.float32)
    acc_region = tl.zeros((BLOCK_L,), tl.float32)
    acc_kl = tl.zeros((BLOCK_L,), tl.float32)
    acc_k3 = tl.zeros((BLOCK_L,), tl.float32)
    acc_ratio = tl.zeros((BLOCK_L,), tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs = l0 + tl.arange(0, BLOCK_L)
        ml = offs < L
        mk = tl.load(mask_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
        lp = tl.load(logp_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
        on = mk != 0
        lp = tl.where(on, lp, 0.0)
        if SEQ_LEVEL:
            r = tl.zeros((BLOCK_L,), tl.float32) + r_seq
        else:
            old = tl.load(old_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            r = tl.exp(tl.where(on, lp - old, 0.0))
        if TOKEN_ADV:
            adv_t = tl.load(adv_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
        else:
            adv_t = adv_l
        low = offs < 0  # all False: sapo and vespo clip nothing, cispo only high
        high = offs < 0
        if SURROGATE == 0:
            c2 = tl.minimum(tl.maximum(r, lo), hi)
            if HAS_DELTA:
                c1 = tl.minimum(r, delta)
            else:
                c1 = r
            pt = -tl.minimum(c1 * adv_t, c2 * adv_t)
            low = (c1 < lo) & (adv_t < 0)
            high = (c1 > hi) & (adv_t > 0)
        elif SURROGATE == 1:
            pt = -tl.minimum(r, cap) * adv_t * lp
            high = (r > cap) & (adv_t > 0)
        elif SURROGATE == 2:
            tau = tl.where(adv_t > 0, t_pos, t_neg)
            pt = -_sigmoid(tau * (r - 1.0)) * 4.0 / tau * adv_t
        else:
            pt = -phi * adv_t * lp
        if HAS_REF:
            ref = tl.load(ref_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            k3 = _k3(tl.where(on, ref - lp, 0.0))
            acc_k3 += mk * k3
            if KL_CORR:
                kl = k3 * r
            else:
                kl = k3
            acc_kl += mk * kl
            if HAS_KL:
                pt += beta * kl
        acc_loss += mk * pt
        acc_msum += mk
        acc_low += tl.where(low, mk, 0.0)
        acc_high += tl.where(high, mk, 0.0)
        acc_region += tl.where(low | high, mk, 0.0)
        acc_ratio += mk * r

    out = rows_ptr + b.to(tl.int64) * 10
    tl.store(out + 0, tl.sum(acc_loss, axis=0))
    tl.store(out + 1, tl.sum(acc_msum, axis=0))
    tl.store(out + 2, lrsum)
    tl.store(out + 3, tl.sum(acc_low, axis=0))
    tl.store(out + 4, tl.sum(acc_high, axis=0))
    tl.store(out + 5, tl.sum(acc_region, axis=0))
    tl.store(out + 6, tl.sum(acc_kl, axis=0))
    tl.store(out + 7, tl.sum(acc_ratio, axis=0))
    tl.store(out + 8, tl.sum(acc_k3, axis=0))
    tl.store(out + 9, phi)


@triton.jit
def _policy_reduce_kernel(
    ids_ptr, rows_ptr, loss_ptr, met_ptr, cnt_ptr, B, A, Lc,
    NORM: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """losses[a], metrics[:, a], counts (sequences, tokens) of adapter ``a`` from its rows.
    ``Lc`` (fp32) is dr_grpo's length normaliser, max_completion_length, not the batch width."""
    a = tl.program_id(0)
    n_seq = tl.zeros((BLOCK_B,), tl.float32)
    n_tok = tl.zeros((BLOCK_B,), tl.float32)
    num = tl.zeros((BLOCK_B,), tl.float32)
    low = tl.zeros((BLOCK_B,), tl.float32)
    high = tl.zeros((BLOCK_B,), tl.float32)
    region = tl.zeros((BLOCK_B,), tl.float32)
    kl = tl.zeros((BLOCK_B,), tl.float32)
    ratio = tl.zeros((BLOCK_B,), tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs = b0 + tl.arange(0, BLOCK_B)
        ids = tl.load(ids_ptr + offs, mask=offs < B, other=-1)
        sel = ids == a
        row = rows_ptr + offs.to(tl.int64) * 10
        loss = tl.load(row + 0, mask=sel, other=0.0)
        msum = tl.load(row + 1, mask=sel, other=0.0)
        n_seq += sel.to(tl.float32)
        n_tok += msum
        if NORM == 0:
            num += loss / tl.maximum(msum, 1.0)
        else:
            num += loss
        low += tl.load(row + 3, mask=sel, other=0.0)
        high += tl.load(row + 4, mask=sel, other=0.0)
        region += tl.load(row + 5, mask=sel, other=0.0)
        kl += tl.load(row + 6, mask=sel, other=0.0)
        ratio += tl.load(row + 7, mask=sel, other=0.0)
    n = tl.sum(n_seq, axis=0)
    tok = tl.sum(n_tok, axis=0)
    tok_div = tl.maximum(tok, 1.0)
    if NORM == 2:
        total = tl.sum(num, axis=0) / tl.maximum(n * Lc, 1.0)
    elif NORM == 3:
        total = tl.sum(num, axis=0) / tok_div
    else:
        total = tl.sum(num, axis=0) / tl.maximum(n, 1.0)
    tl.store(loss_ptr + a, total)
    tl.store(met_ptr + 0 * A + a, tl.sum(low, axis=0) / tok_div)
    tl.store(met_ptr + 1 * A + a, tl.sum(high, axis=0) / tok_div)
    tl.store(met_ptr + 2 * A + a, tl.sum(region, axis=0) / tok_div)
    tl.store(met_ptr + 3 * A + a, tl.sum(kl, axis=0) / tok_div)
    tl.store(met_ptr + 4 * A + a, tl.sum(ratio, axis=0) / tok_div)
    tl.store(cnt_ptr + a, n)
    tl.store(cnt_ptr + A + a, tok)


@triton.jit
def _policy_bwd_kernel(
    logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_ptr, ids_ptr, rows_ptr, cnt_ptr, gloss_ptr, dlogp_ptr,
    L, A, Lc, lo, hi, cap, delta, beta, t_pos, t_neg,
    NORM: tl.constexpr, SURROGATE: tl.constexpr, SEQ_LEVEL: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_KL: tl.constexpr, KL_CORR: tl.constexpr, TOKEN_ADV: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dlogp[b, :] = d(sum_a g_a loss_a) / d logp[b, :]. Sequence level: the row's loss is
    msum * loss_tok(w) with w = sum_l mask_l log_ratio_l / max(msum, 1), so token l gets
    mask_l * msum / max(msum, 1) * d loss_tok / dw. Corrected KL: d [k3(ref - lp) r] / d lp is
    -r (ref - lp) at token level; at sequence level r_b (1 - e^(ref - lp)) plus the row's
    sum mask * k3 times r_b / max(msum, 1)."""
    b = tl.program_id(0)
    base = b.to(tl.int64) * L
    row = rows_ptr + b.to(tl.int64) * 10
    a = tl.load(ids_ptr + b)
    g = tl.load(gloss_ptr + a)
    n = tl.load(cnt_ptr + a)
    tok = tl.load(cnt_ptr + A + a)
    msum = tl.load(row + 1)
    if TOKEN_ADV:
        adv = 0.0  # unused: every use below reads the per-token adv_t
    else:
        adv = tl.load(adv_ptr + b).to(tl.float32)
    if NORM == 0:
        w_row = g / (tl.maximum(msum, 1.0) * tl.maximum(n, 1.0))
    elif NORM == 1:
        w_row = g / tl.maximum(n, 1.0)
    elif NORM == 2:
        w_row = g / tl.maximum(n * Lc, 1.0)
    else:
        w_row = g / tl.maximum(tok, 1.0)

    r_seq = tl.exp(tl.load(row + 2) / tl.maximum(msum, 1.0))
    share = msum / tl.maximum(msum, 1.0)
    seq_coef = 0.0
    if SEQ_LEVEL and (SURROGATE == 0 or SURROGATE == 2):
        seq_coef = _dsurrogate_dw(r_seq, adv, lo, hi, delta, t_pos, t_neg, SURROGATE, HAS_DELTA) * share
    phi = tl.load(row + 9)
    kl_seq = beta * r_seq * tl.load(row + 8) / tl.maximum(msum, 1.0)

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
        if TOKEN_ADV:
            adv_t = tl.load(adv_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
        else:
            adv_t = tl.zeros((BLOCK_L,), tl.float32) + adv
        if SURROGATE == 1:
            d = -mk * tl.minimum(r, cap) * adv_t
        elif SURROGATE == 3:
            d = -mk * phi * adv_t
        elif SEQ_LEVEL:
            d = mk * seq_coef
        else:
            d = mk * _dsurrogate_dw(r, adv_t, lo, hi, delta, t_pos, t_neg, SURROGATE, HAS_DELTA)
        if HAS_KL:
            ref = tl.load(ref_ptr + base + offs, mask=ml, other=0.0).to(tl.float32)
            dref = tl.where(on, ref - lp, 0.0)
            if KL_CORR:
                if SEQ_LEVEL:
                    d += mk * (beta * r_seq * (1.0 - tl.exp(dref)) + kl_seq)
                else:
                    d -= mk * beta * r * dref
            else:
                d += mk * beta * (1.0 - tl.exp(dref))
        tl.store(dlogp_ptr + base + offs, (w_row * d).to(dlogp_ptr.dtype.element_ty), mask=ml)
