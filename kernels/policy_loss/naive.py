"""Reference clipped-surrogate policy loss with k3 KL, aggregated per adapter. The spec.

For the sequences ``b`` of adapter ``a`` (``adapter_ids[b] == a``), exactly TRL's
``GRPOTrainer._compute_loss`` (trl 1.16) on that subset:

    log_ratio = logp - old_logp                            (0 on masked-out tokens)
    w         = log_ratio                                  importance_level="token"
              = sum_l(mask * log_ratio) / max(sum_l mask, 1)   "sequence" (GSPO), one per row
    r         = exp(w)
    r2        = clamp(r, 1 - eps_low, 1 + eps_high)
    r1        = min(r, delta) if delta is not None else r  (two-sided clipping)
    loss_tok  = -min(r1 * A_b, r2 * A_b) + beta * kl,      kl = exp(ref - logp) - (ref - logp) - 1
    grpo:    mean over the adapter's sequences of (sum_l mask * loss_tok) / max(sum_l mask, 1)
    bnpo:    sum(mask * loss_tok) / max(sum mask, 1)
    dr_grpo: sum(mask * loss_tok) / (num_sequences * max_completion_length)
    dapo:    sum(mask * loss_tok) / max(sum mask, 1)       (TRL's token count over one process)

Each adapter is normalised over its own sequences and tokens only, so adding another adapter's
sequences never changes adapter a's loss or gradient. dr_grpo's ``max_completion_length`` is a
constant (TRL's config value, the generation cap), not the batch's padded width L: with L, the
longest completion of *any* adapter in the batch would rescale every adapter's loss. Passing
None falls back to L (only right when L is fixed, e.g. completions always padded to the cap).
Masked-out tokens enter as log-ratio 0 (ratio 1, kl 0) rather than as ``inf * 0``: garbage
log-probs at padding cannot make a nan.

Metrics (token means over the adapter's masked tokens, TRL's ``clip_ratio/*`` and ``kl``):
``clip_frac_low`` = mean(r1 < 1 - eps_low and A < 0), ``clip_frac_high`` = mean(r1 > 1 + eps_high
and A > 0), ``clip_frac`` = either, ``kl_mean`` = mean(kl) (0 without ``ref_logp``),
``ratio_mean`` = mean(r). At sequence level TRL averages the clip flags over sequences; here
every token carries its sequence's flag, so sequences weigh by their token count.
"""
from __future__ import annotations

import numbers

import torch

LOSS_TYPES = {"grpo": 0, "bnpo": 1, "dr_grpo": 2, "dapo": 3}
IMPORTANCE_LEVELS = ("token", "sequence")
METRIC_NAMES = ("clip_frac_low", "clip_frac_high", "clip_frac", "kl_mean", "ratio_mean")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def check_policy_loss_inputs(logp, old_logp, advantages, mask, adapter_ids, ref_logp, loss_type,
                             eps_low, eps_high, delta, beta, importance_level, num_adapters,
                             triton, max_completion_length=None):
    """Validate everything; return (B, L, A, Lc) with Lc the dr_grpo length normaliser
    (``max_completion_length``, or L when it is None). Shared by the naive and the Triton path."""
    if not _is_float(logp) or logp.dim() != 2:
        raise ValueError("logp must be a floating tensor [B, L] (one row per completion); "
                         "reshape per-token log-probs to [B, L]")
    B, L = logp.shape
    if triton and logp.dtype not in _TRITON_DTYPES:
        raise ValueError(f"the Triton path takes fp16/bf16/fp32 logp, got {logp.dtype}; "
                         "use policy_loss_naive for float64")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if name == "ref_logp" and t is None:
            continue
        if not _is_float(t) or t.shape != logp.shape:
            raise ValueError(f"{name} must be a floating tensor shaped like logp {tuple(logp.shape)}, "
                             f"got {getattr(t, 'shape', type(t))}; pass per-token log-probs [B, L]")
    if not _is_float(advantages) or advantages.shape != (B,):
        raise ValueError(f"advantages must be a floating tensor [B]=[{B}] (one per sequence), got "
                         f"{getattr(advantages, 'shape', type(advantages))}; squeeze or expand it")
    if not isinstance(mask, torch.Tensor) or mask.shape != logp.shape or mask.is_complex():
        raise ValueError(f"mask must be a bool/int/float tensor shaped like logp {tuple(logp.shape)}; "
                         "pass the completion mask [B, L]")
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.shape != (B,) \
            or adapter_ids.is_floating_point() or adapter_ids.is_complex() or adapter_ids.dtype == torch.bool:
        raise ValueError(f"adapter_ids must be an integer tensor [B]=[{B}] (one adapter per sequence); "
                         "use adapter_ids.long()")
    tensors = [old_logp, advantages, mask, adapter_ids] + ([ref_logp] if ref_logp is not None else [])
    if any(t.device != logp.device for t in tensors):
        raise ValueError("all policy-loss inputs must be on logp's device; move them with .to(logp.device)")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {sorted(LOSS_TYPES)}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"unknown importance_level {importance_level!r}; use 'token' or 'sequence' (GSPO)")
    if not (eps_low >= 0 and eps_high >= 0):
        raise ValueError(f"eps_low and eps_high must be >= 0, got {eps_low}, {eps_high}")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta must be > 0 (TRL suggests > 1 + eps_high) or None, got {delta}")
    if beta != 0 and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (reference-model per-token log-probs [B, L]); "
                         "pass ref_logp or set beta=0")
    if B and int(adapter_ids.min()) < 0:
        raise ValueError("adapter_ids must be >= 0; drop base-only (id -1) sequences from the loss batch")
    A = (int(adapter_ids.max()) + 1 if B else 0) if num_adapters is None else int(num_adapters)
    if B and int(adapter_ids.max()) >= A:
        raise ValueError(f"adapter_ids go up to {int(adapter_ids.max())} but num_adapters={A}; "
                         "raise num_adapters or leave it None")
    if max_completion_length is None:
        Lc = L
    else:
        mcl = max_completion_length
        if isinstance(mcl, bool) or not isinstance(mcl, numbers.Integral) or mcl < 1:
            raise ValueError(f"max_completion_length must be an int >= 1 (the generation cap, e.g. "
                             f"max_new_tokens) or None, got {max_completion_length!r}")
        Lc = int(max_completion_length)
        if Lc < L:
            raise ValueError(f"max_completion_length={Lc} is smaller than the completion width L={L}; "
                             "pass the generation cap (>= every completion's length) or truncate the "
                             f"[B, L] inputs to {Lc} columns")
    return B, L, A, Lc


def policy_loss_naive(logp, old_logp, advantages, mask, adapter_ids, ref_logp=None,
                      loss_type="dapo", eps_low=0.2, eps_high=0.2, delta=None, beta=0.0,
                      importance_level="token", num_adapters=None, max_completion_length=None):
    """Clipped surrogate + k3 KL per adapter, in plain PyTorch (fp32; fp64 for fp64 ``logp``).

    Args:
        logp: [B, L] float, current-policy per-token log-probs (the only differentiable input).
        old_logp: [B, L] float, behaviour-policy log-probs (constant).
        advantages: [B] float, one per sequence (constant).
        mask: [B, L] bool/int/float completion mask (float values act as token weights).
        adapter_ids: [B] int in [0, num_adapters).
        ref_logp: [B, L] float reference log-probs, or None (then beta must be 0).
        loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" (TRL's definitions, per adapter).
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high].
        delta: upper bound on the unclipped ratio (two-sided clipping), or None.
        beta: KL coefficient.
        importance_level: "token" or "sequence" (GSPO).
        num_adapters: A; None means ``adapter_ids.max() + 1``.
        max_completion_length: int >= L, dr_grpo's length normaliser (TRL's
            ``max_completion_length``): pass your generation cap. None means the padded width
            L, which makes dr_grpo depend on the batch's longest completion (another adapter's
            included). Other loss types ignore it (beyond validation).

    Returns:
        ``(losses [A], metrics)``: fp32 (fp64 for fp64 ``logp``); metrics maps each of
        ``METRIC_NAMES`` to an [A] tensor. An adapter without tokens has loss 0 and metrics 0.

    Raises:
        ValueError: as ``policy_loss_triton``; also ``max_completion_length`` not an int >= 1
            or smaller than L.
    """
    B, L, A, Lc = check_policy_loss_inputs(logp, old_logp, advantages, mask, adapter_ids, ref_logp,
                                           loss_type, eps_low, eps_high, delta, beta,
                                           importance_level, num_adapters, triton=False,
                                           max_completion_length=max_completion_length)
    ct = torch.float64 if logp.dtype == torch.float64 else torch.float32
    lp_all, old_all = logp.to(ct), old_logp.to(ct)
    m_all, adv_all = mask.to(ct), advantages.to(ct)
    ref_all = ref_logp.to(ct) if ref_logp is not None else None
    lo, hi = 1.0 - eps_low, 1.0 + eps_high

    losses = []
    metrics = {k: [] for k in METRIC_NAMES}
    for a in range(A):
        sel = adapter_ids == a
        lp, old, m = lp_all[sel], old_all[sel], m_all[sel]
        adv = adv_all[sel].unsqueeze(1)
        on = m != 0
        log_ratio = torch.where(on, lp - old, torch.zeros_like(lp))
        if importance_level == "sequence":
            log_w = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        else:
            log_w = log_ratio
        coef_1 = torch.exp(log_w)
        ratio = coef_1
        coef_2 = torch.clamp(coef_1, lo, hi)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
        kl = torch.zeros_like(lp)
        if ref_all is not None:
            diff = torch.where(on, ref_all[sel] - lp, torch.zeros_like(lp))
            kl = torch.exp(diff) - diff - 1
            if beta != 0:
                per_token_loss = per_token_loss + beta * kl

        masked = per_token_loss * m
        n_seq = lp.shape[0]
        n_tok = m.sum().clamp(min=1.0)
        if loss_type == "grpo":
            loss = (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / max(n_seq, 1)
        elif loss_type == "dr_grpo":
            loss = masked.sum() / max(n_seq * Lc, 1)
        else:
            loss = masked.sum() / n_tok
        losses.append(loss)

        is_low = ((coef_1 < lo) & (adv < 0)).to(ct).expand_as(m)
        is_high = ((coef_1 > hi) & (adv > 0)).to(ct).expand_as(m)
        metrics["clip_frac_low"].append((is_low * m).sum() / n_tok)
        metrics["clip_frac_high"].append((is_high * m).sum() / n_tok)
        metrics["clip_frac"].append((torch.maximum(is_low, is_high) * m).sum() / n_tok)
        metrics["kl_mean"].append((kl.detach() * m).sum() / n_tok)
        metrics["ratio_mean"].append((ratio.detach().expand_as(m) * m).sum() / n_tok)

    if A == 0:
        return lp_all.new_zeros(0), {k: lp_all.new_zeros(0) for k in METRIC_NAMES}
    return torch.stack(losses), {k: torch.stack(v).detach() for k, v in metrics.items()}
