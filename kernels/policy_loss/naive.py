"""Reference per-adapter policy loss (TRL 1.16's GRPO loss family) with k3 KL. The spec.

For the sequences ``b`` of adapter ``a`` (``adapter_ids[b] == a``), exactly TRL's
``GRPOTrainer._compute_loss`` (trl 1.16) on that subset, with ``lp = logp`` where mask != 0
and 0 elsewhere (so garbage log-probs at padding cannot make a nan):

    log_ratio = logp - old_logp                            (0 on masked-out tokens)
    w         = log_ratio                                  importance_level="token"
              = sum_l(mask * log_ratio) / max(sum_l mask, 1)   "sequence" (GSPO), one per row
    r         = exp(w)
    loss_tok, by the loss type's surrogate (``loss_types.SURROGATE``):
      clip  (grpo, bnpo, dr_grpo, dapo, luspo)
              -min(r1 * A_b, r2 * A_b),  r2 = clamp(r, 1 - eps_low, 1 + eps_high),
                                         r1 = min(r, delta) (two-sided clipping) or r
      cispo   -sg(min(r, eps_high)) * A_b * lp             eps_high is the cap itself (TRL's
                                                           epsilon_high: recommended 5.0, default
                                                           epsilon = 0.2, as ours)
      sapo    -sigmoid(tau * (r - 1)) * 4 / tau * A_b,     tau = sapo_temperature_pos if A_b > 0
                                                               else sapo_temperature_neg
      vespo   -sg(phi_b) * A_b * lp,  phi_b = exp(lam + k log W - lam W) (nan/inf -> 0), with
              log W = clamp(sum_l mask * clamp(log_ratio, -20, 20), log 1e-8, 20) (a sum, not a
              mean, whatever importance_level), (k, lam) = (vespo_k_pos, vespo_lambda_pos) if
              A_b >= 0 else the _neg pair, lam clamped to >= 1e-4
    kl        = exp(ref - logp) - (ref - logp) - 1         (k3; 0 on masked-out tokens)
              * r   with kl_correction (TRL's use_bias_correction_kl; r before the delta clamp)
    loss_tok += beta * kl

``A_b`` may also be ``A_bt``, one advantage per token (token-level rewards, PPO's GAE): every
formula above then reads elementwise (token importance only; not vespo, whose phi is per row).
``sg`` is stop-gradient. The adapter's loss is its masked sum of ``loss_tok`` (grpo and sapo:
of per-sequence means) over the normaliser ``loss_types.loss_normalisers`` gives: sequences
(grpo, sapo, luspo), sequences * max_completion_length (dr_grpo) or tokens (bnpo, dapo,
cispo, vespo). Each adapter is normalised over its own sequences and tokens only, so adding
another adapter's sequences never changes adapter a's loss or gradient. dr_grpo's
``max_completion_length`` is a constant (TRL's config value, the generation cap), not the
batch's padded width L: with L, the longest completion of *any* adapter in the batch would
rescale every adapter's loss. Passing None falls back to L (only right when L is fixed).

TRL parity: TRL 1.16's ``GRPOConfig.use_bias_correction_kl`` defaults to True, so parity
with a default TRL config needs ``kl_correction=True``; ``kl_correction=False`` (our default)
is plain k3, TRL with ``use_bias_correction_kl=False``. TRL's importance sampling against
vLLM's sampler, entropy mask and off-policy mask are not part of this loss.

Metrics (token means over the adapter's masked tokens): ``clip_frac_low`` = mean(r1 < 1 -
eps_low and A < 0), ``clip_frac_high`` = mean(r1 > 1 + eps_high and A > 0), ``clip_frac`` =
either (TRL's ``clip_ratio/*``; for cispo ``clip_frac_high`` = ``clip_frac`` = mean(r >
eps_high and A > 0), TRL's ``cispo_clip_ratio``, and ``clip_frac_low`` = 0; sapo and vespo
clip nothing: 0), ``kl_mean`` = mean(kl) (corrected with ``kl_correction``; 0 without
``ref_logp``), ``ratio_mean`` = mean(r). At sequence level TRL averages the clip flags over
sequences; here every token carries its sequence's flag, so sequences weigh by their tokens.
"""
from __future__ import annotations

import math
import numbers

import torch

from .loss_types import NORMALISER, SEQUENCE_ADVANTAGE_ONLY, SURROGATE, check_loss_type, loss_normalisers

IMPORTANCE_LEVELS = ("token", "sequence")
METRIC_NAMES = ("clip_frac_low", "clip_frac_high", "clip_frac", "kl_mean", "ratio_mean")
# The loss-type hyperparameters' defaults, keyword -> value: GRPOConfig 1.16's, except
# kl_correction (TRL's use_bias_correction_kl defaults to True; plain k3 here, as before).
LOSS_OPTION_DEFAULTS = dict(kl_correction=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                            vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
# VESPO clamps log W to [log 1e-8, 20] (TRL's get_gamma_weights) and lambda to >= 1e-4.
VESPO_LOG_W_MIN, VESPO_LOG_W_MAX, VESPO_LAMBDA_MIN = math.log(1e-8), 20.0, 1e-4
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
    if not _is_float(advantages) or advantages.shape not in ((B,), (B, L)):
        raise ValueError(f"advantages must be a floating tensor [B]=[{B}] (one per sequence) or [B, L]=[{B}, {L}] "
                         f"(one per token), got {getattr(advantages, 'shape', type(advantages))}")
    if advantages.dim() == 2 and (importance_level == "sequence" or loss_type in SEQUENCE_ADVANTAGE_ONLY):
        # GSPO's ratio and VESPO's phi are per sequence, and so is the advantage they pair with.
        raise ValueError(f"per-token advantages [B, L] need importance_level='token' and a loss type other "
                         f"than vespo (got {importance_level!r}, {loss_type!r}); pass one advantage per sequence")
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
    check_loss_type(loss_type)
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


def check_loss_options(kl_correction=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                       vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0) -> dict:
    """Validate the loss-type hyperparameters (TRL's GRPOConfig names); return them as floats."""
    if not isinstance(kl_correction, bool):
        raise ValueError(f"kl_correction must be True (TRL's use_bias_correction_kl, its default: k3 "
                         f"times the importance ratio) or False (plain k3), got {kl_correction!r}")
    out = dict(kl_correction=kl_correction)
    for name, v in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg),
                    ("vespo_k_pos", vespo_k_pos), ("vespo_lambda_pos", vespo_lambda_pos),
                    ("vespo_k_neg", vespo_k_neg), ("vespo_lambda_neg", vespo_lambda_neg)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}; TRL's default is "
                             f"{LOSS_OPTION_DEFAULTS[name]}")
        if name.startswith("sapo") and not v > 0:
            raise ValueError(f"{name} must be > 0 (sapo divides by it), got {v}; TRL's default is "
                             f"{LOSS_OPTION_DEFAULTS[name]}")
        out[name] = float(v)
    return out


def _surrogate(kind, r, adv, lp, log_ratio, m, lo, hi, delta, eps_high, opt):
    """(loss_tok, clipped-low flags, clipped-high flags) of one adapter's rows; see the module doc."""
    none = torch.zeros_like(r, dtype=torch.bool)
    if kind == "clip":
        r2 = torch.clamp(r, lo, hi)
        r1 = torch.clamp(r, max=delta) if delta is not None else r
        return -torch.min(r1 * adv, r2 * adv), (r1 < lo) & (adv < 0), (r1 > hi) & (adv > 0)
    if kind == "cispo":
        return -torch.clamp(r, max=eps_high).detach() * adv * lp, none, (r > eps_high) & (adv > 0)
    if kind == "sapo":
        # new_tensor: torch.where of two Python floats would round them to fp32 (1.05 -> 1.0499999523)
        tau = torch.where(adv > 0, adv.new_tensor(opt["sapo_temperature_pos"]),
                          adv.new_tensor(opt["sapo_temperature_neg"]))
        return -torch.sigmoid(tau * (r - 1)) * 4 / tau * adv, none, none
    with torch.no_grad():  # vespo: phi only scales the gradient
        lr_c = torch.clamp(log_ratio, -20.0, 20.0)
        log_w = torch.clamp((lr_c * m).sum(-1, keepdim=True), VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)
        nonneg = adv >= 0
        k = torch.where(nonneg, adv.new_tensor(opt["vespo_k_pos"]), adv.new_tensor(opt["vespo_k_neg"]))
        lam = torch.where(nonneg, adv.new_tensor(opt["vespo_lambda_pos"]),
                          adv.new_tensor(opt["vespo_lambda_neg"])).clamp(min=VESPO_LAMBDA_MIN)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * adv * lp, none, none


def policy_loss_naive(logp, old_logp, advantages, mask, adapter_ids, ref_logp=None,
                      loss_type="dapo", eps_low=0.2, eps_high=0.2, delta=None, beta=0.0,
                      importance_level="token", num_adapters=None, max_completion_length=None,
                      kl_correction=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                      vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    """Per-adapter policy loss + k3 KL in plain PyTorch (fp32; fp64 for fp64 ``logp``).

    Args: as ``policy_loss_triton`` (the module docstring gives every formula).

    Returns:
        ``(losses [A], metrics)``: fp32 (fp64 for fp64 ``logp``); metrics maps each of
        ``METRIC_NAMES`` to an [A] tensor. An adapter without tokens has loss 0 and metrics 0.

    Raises:
        ValueError: as ``policy_loss_triton``.
    """
    B, L, A, Lc = check_policy_loss_inputs(logp, old_logp, advantages, mask, adapter_ids, ref_logp,
                                           loss_type, eps_low, eps_high, delta, beta,
                                           importance_level, num_adapters, triton=False,
                                           max_completion_length=max_completion_length)
    opt = check_loss_options(kl_correction, sapo_temperature_pos, sapo_temperature_neg,
                             vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
    ct = torch.float64 if logp.dtype == torch.float64 else torch.float32
    lp_all, old_all = logp.to(ct), old_logp.to(ct)
    m_all, adv_all = mask.to(ct), advantages.to(ct)
    ref_all = ref_logp.to(ct) if ref_logp is not None else None
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    kind, row_mean = SURROGATE[loss_type], NORMALISER[loss_type] == "sequence_mean"
    loss_den, tok_den = loss_normalisers(adapter_ids, mask, A, loss_type, Lc, dtype=ct)

    losses = []
    metrics = {k: [] for k in METRIC_NAMES}
    for a in range(A):
        sel = adapter_ids == a
        m = m_all[sel]
        adv = adv_all[sel] if adv_all.dim() == 2 else adv_all[sel].unsqueeze(1)
        on = m != 0
        lp = torch.where(on, lp_all[sel], torch.zeros_like(m))
        log_ratio = torch.where(on, lp_all[sel] - old_all[sel], torch.zeros_like(m))
        if importance_level == "sequence":
            log_w = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        else:
            log_w = log_ratio
        ratio = torch.exp(log_w)
        per_token_loss, is_low, is_high = _surrogate(kind, ratio, adv, lp, log_ratio, m, lo, hi, delta,
                                                     eps_high, opt)
        kl = torch.zeros_like(m)
        if ref_all is not None:
            diff = torch.where(on, ref_all[sel] - lp_all[sel], torch.zeros_like(m))
            kl = torch.exp(diff) - diff - 1
            if opt["kl_correction"]:
                kl = kl * ratio
            if beta != 0:
                per_token_loss = per_token_loss + beta * kl

        masked = per_token_loss * m
        if row_mean:
            num = (masked.sum(-1) / m.sum(-1).clamp(min=1.0)).sum()
        else:
            num = masked.sum()
        losses.append(num / loss_den[a])

        n_tok = tok_den[a]
        is_low, is_high = is_low.to(ct).expand_as(m), is_high.to(ct).expand_as(m)
        metrics["clip_frac_low"].append((is_low * m).sum() / n_tok)
        metrics["clip_frac_high"].append((is_high * m).sum() / n_tok)
        metrics["clip_frac"].append((torch.maximum(is_low, is_high) * m).sum() / n_tok)
        metrics["kl_mean"].append((kl.detach() * m).sum() / n_tok)
        metrics["ratio_mean"].append((ratio.detach().expand_as(m) * m).sum() / n_tok)

    if A == 0:
        return lp_all.new_zeros(0), {k: lp_all.new_zeros(0) for k in METRIC_NAMES}
    return torch.stack(losses), {k: torch.stack(v).detach() for k, v in metrics.items()}
