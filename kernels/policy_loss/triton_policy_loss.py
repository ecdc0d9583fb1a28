"""Fused per-adapter policy loss (TRL 1.16's GRPO loss types) + k3 KL in Triton, fwd + bwd.

The objective is the one in ``naive.py`` (TRL's GRPOTrainer loss on each adapter's sequences).
Three kernels (in ``triton_policy_kernels.py``), no atomics, so losses and gradients are
deterministic:

- ``_policy_rows_kernel``, grid (B,): one program per sequence walks its L tokens (twice when
  the ratio is per sequence, GSPO, or for vespo's phi: both need the row's summed log-ratio
  first) and writes 10 fp32 row statistics (the loss sum, the mask sum, the log-ratio sum, clip
  counts, KL sums, ratio sum, phi).
- ``_policy_reduce_kernel``, grid (A,): one program per adapter sums its rows and applies the
  loss type's normaliser (sequences, tokens, or sequences * max_completion_length); it also
  keeps the adapter's sequence and token counts for the backward.
- ``_policy_bwd_kernel``, grid (B,): d loss_a / d logp[b, l] from the row's normaliser and
  the per-token derivative, with PyTorch's autograd conventions at the clip kinks so that the
  gradient equals the reference's exactly on clip boundaries.

Memory traffic is 4-5 reads of [B, L] and one write; nothing [B, L] is stored for backward
beyond the inputs.

The autograd layer is a pair of ``torch.library`` custom ops with fake implementations
(``lora_engine::policy_loss`` and its backward), so ``torch.compile`` traces the loss without a
graph break. A custom op takes no dict: the launch config travels as its float entries
(``FLOAT_KEYS``) and its int/bool entries (``INT_KEYS``); a new key goes into one of them, and
``policy_loss_apply`` refuses a config with a key it does not know rather than drop it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton

from .loss_types import NORMALISER, NORMALISERS, SURROGATE, SURROGATES
from .naive import METRIC_NAMES, check_loss_options, check_policy_loss_inputs
# Imported by name so that the launchers below look them up in this module (bench/compile_check.py
# swaps this module's kernels for recorders).
from .triton_policy_kernels import NSTAT, _policy_bwd_kernel, _policy_reduce_kernel, _policy_rows_kernel

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
    rows = torch.empty((B, NSTAT), device=logp.device, dtype=torch.float32)
    _policy_rows_kernel[(B,)](
        logp, old, ref if ref is not None else logp, mask, adv, rows,
        L, cfg["lo"], cfg["hi"], cfg["cap"], cfg["delta"], cfg["beta"], cfg["t_pos"], cfg["t_neg"],
        cfg["k_pos"], cfg["lam_pos"], cfg["k_neg"], cfg["lam_neg"],
        SURROGATE=cfg["surrogate"], SEQ_LEVEL=cfg["seq"], HAS_DELTA=cfg["has_delta"],
        HAS_REF=ref is not None, HAS_KL=cfg["has_kl"], KL_CORR=cfg["kl_corr"] and ref is not None,
        TOKEN_ADV=adv.dim() == 2, BLOCK_L=BLOCK_L, num_warps=4,
    )
    losses = torch.empty((A,), device=logp.device, dtype=torch.float32)
    metrics = torch.empty((len(METRIC_NAMES), A), device=logp.device, dtype=torch.float32)
    counts = torch.empty((2, A), device=logp.device, dtype=torch.float32)
    _policy_reduce_kernel[(A,)](ids, rows, losses, metrics, counts, B, A, cfg["Lc"],
                                NORM=cfg["norm"], BLOCK_B=BLOCK_B, num_warps=4)
    return losses, metrics, rows, counts


def _policy_bwd(logp, old, ref, mask, adv, ids, rows, counts, g_losses, cfg):
    B, L = logp.shape
    A = counts.shape[1]
    BLOCK_L, _ = _blocks(B, L)
    dlogp = torch.empty_like(logp)
    _policy_bwd_kernel[(B,)](
        logp, old, ref if ref is not None else logp, mask, adv, ids, rows, counts, g_losses, dlogp,
        L, A, cfg["Lc"], cfg["lo"], cfg["hi"], cfg["cap"], cfg["delta"], cfg["beta"], cfg["t_pos"], cfg["t_neg"],
        NORM=cfg["norm"], SURROGATE=cfg["surrogate"], SEQ_LEVEL=cfg["seq"], HAS_DELTA=cfg["has_delta"],
        # the correction only changes the gradient through beta * kl: no extra variant at beta = 0
        HAS_KL=cfg["has_kl"], KL_CORR=cfg["kl_corr"] and cfg["has_kl"], TOKEN_ADV=adv.dim() == 2,
        BLOCK_L=BLOCK_L, num_warps=4,
    )
    return dlogp


# --- autograd: custom ops (torch.compile traces them; CUDA graphs capture them) ----------------

FLOAT_KEYS = ("lo", "hi", "cap", "delta", "beta", "t_pos", "t_neg", "k_pos", "lam_pos", "k_neg", "lam_neg", "Lc")
INT_KEYS = ("has_delta", "has_kl", "kl_corr", "seq", "surrogate", "norm")
CFG_KEYS = FLOAT_KEYS + INT_KEYS


def _cfg(floats, ints) -> dict:
    return {**dict(zip(FLOAT_KEYS, floats)), **{k: (bool(v) if k.startswith(("has_", "kl_", "seq")) else int(v))
                                                 for k, v in zip(INT_KEYS, ints)}}


@torch.library.custom_op("lora_engine::policy_loss", mutates_args=())
def _policy_loss_op(logp: torch.Tensor, old: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                    adv: torch.Tensor, ids: torch.Tensor, A: int, floats: list[float],
                    ints: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses [A], metrics [M, A], row statistics [B, NSTAT], counts [2, A]), fp32; the last two
    are for the backward."""
    return _policy_fwd(logp, old, ref, mask, adv, ids, A, _cfg(floats, ints))


@_policy_loss_op.register_fake
def _(logp, old, ref, mask, adv, ids, A, floats, ints):
    f32 = lambda *shape: logp.new_empty(shape, dtype=torch.float32)
    return f32(A), f32(len(METRIC_NAMES), A), f32(logp.shape[0], NSTAT), f32(2, A)


@torch.library.custom_op("lora_engine::policy_loss_backward", mutates_args=())
def _policy_loss_bwd_op(logp: torch.Tensor, old: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                        adv: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                        g_losses: torch.Tensor, floats: list[float], ints: list[int]) -> torch.Tensor:
    return _policy_bwd(logp, old, ref, mask, adv, ids, rows, counts, g_losses, _cfg(floats, ints))


@_policy_loss_bwd_op.register_fake
def _(logp, old, ref, mask, adv, ids, rows, counts, g_losses, floats, ints):
    return torch.empty_like(logp)


def _setup(ctx, inputs, output):
    logp, old, ref, mask, adv, ids, A, floats, ints = inputs
    _, _, rows, counts = output
    ctx.save_for_backward(logp, old, ref, mask, adv, ids, rows, counts)
    ctx.floats, ctx.ints = floats, ints


def _backward(ctx, g_losses, g_metrics, g_rows, g_counts):
    logp, old, ref, mask, adv, ids, rows, counts = ctx.saved_tensors
    dlogp = None
    if ctx.needs_input_grad[0]:
        # Upstream grads of losses.sum() arrive as a stride-0 expanded view; the kernel indexes them.
        dlogp = _policy_loss_bwd_op(logp, old, ref, mask, adv, ids, rows, counts, g_losses.float().contiguous(),
                                    ctx.floats, ctx.ints)
    return (dlogp,) + (None,) * 8


_policy_loss_op.register_autograd(_backward, setup_context=_setup)


def policy_loss_apply(logp, old, ref, mask, adv, ids, A, cfg):
    """The policy loss's autograd entry: contiguous [B, L] inputs (``mask`` fp32), [B] or [B, L]
    ``adv``, [B] ``ids``, ``A`` adapters, the launch config ``cfg``. Returns (losses [A], metrics [M, A])."""
    if set(cfg) != set(CFG_KEYS):
        raise ValueError(f"policy loss cfg keys {sorted(cfg)} != {sorted(CFG_KEYS)}: add the new keys to "
                         "kernels/policy_loss/triton_policy_loss.py (FLOAT_KEYS or INT_KEYS)")
    floats = [float(cfg[k]) for k in FLOAT_KEYS]
    ints = [int(cfg[k]) for k in INT_KEYS]
    losses, metrics, _, _ = _policy_loss_op(logp, old, ref, mask, adv, ids, int(A), floats, ints)
    return losses, metrics


# --- public function ----------------------------------------------------------------------


def policy_loss_triton(logp, old_logp, advantages, mask, adapter_ids, ref_logp=None,
                       loss_type="dapo", eps_low=0.2, eps_high=0.2, delta=None, beta=0.0,
                       importance_level="token", num_adapters=None, max_completion_length=None,
                       kl_correction=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                       vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    """Per-adapter policy loss + k3 KL (TRL 1.16's GRPO loss types), fused, fwd + bwd.

    Args:
        logp: [B, L] fp16/bf16/fp32, current-policy per-token log-probs (differentiable).
        old_logp: [B, L] float, behaviour-policy log-probs (constant).
        advantages: [B] float, one per sequence, or [B, L], one per token (token-level rewards,
            PPO; token importance only, not vespo), constant.
        mask: [B, L] bool/int/float completion mask (float values act as token weights).
        adapter_ids: [B] int in [0, num_adapters), the adapter of each sequence.
        ref_logp: [B, L] float reference log-probs, or None (then beta must be 0).
        loss_type: one of ``LOSS_TYPES``: "grpo" | "bnpo" | "dr_grpo" | "dapo" | "cispo" |
            "sapo" | "luspo" | "vespo" (TRL's definitions, per adapter; see ``naive.py``).
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] of the clipped types. For
            cispo ``eps_high`` is the cap on the (detached) ratio itself, TRL's ``epsilon_high``
            (ScaleRL's eps_max, recommended 5.0); sapo and vespo use neither.
        delta: upper bound on the unclipped ratio (TRL's two-sided clipping), or None; used by
            the clipped types only (grpo, bnpo, dr_grpo, dapo, luspo), as in TRL.
        beta: coefficient of the KL to the reference.
        importance_level: "token" or "sequence" (GSPO: exp of the mean masked log-ratio). TRL
            recommends "sequence" for luspo and "token" for vespo (whose phi always uses the
            summed sequence log-ratio; the level then only sets the ratio of ``kl_correction``).
        num_adapters: A; None means ``adapter_ids.max() + 1`` (one host sync).
        max_completion_length: int >= L, dr_grpo's length normaliser (TRL's
            ``max_completion_length``): pass your generation cap. None means the padded width
            L, which makes dr_grpo depend on the batch's longest completion (another adapter's
            included). Other loss types ignore it (beyond validation).
        kl_correction: bool, multiply k3 by the importance ratio (token or sequence), TRL's
            ``use_bias_correction_kl``. TRL 1.16 defaults it to True: parity with a default
            ``GRPOConfig`` needs True. False (the default here) is plain k3.
        sapo_temperature_pos, sapo_temperature_neg: float > 0, sapo's gate temperatures for
            A > 0 and A <= 0 (TRL's defaults 1.0, 1.05).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: vespo's Gamma weighting
            for A >= 0 and A < 0 (TRL's defaults 2.0, 3.0, 3.0, 2.0; lambda clamped to >= 1e-4).

    Returns:
        ``(losses, metrics)``: ``losses`` [A] fp32 (differentiable w.r.t. ``logp``; sum them:
        adapters are independent), ``metrics`` a dict of [A] fp32 tensors ``clip_frac_low``,
        ``clip_frac_high``, ``clip_frac``, ``kl_mean``, ``ratio_mean``. An adapter without
        tokens gets loss 0 and metrics 0. The gradient has ``logp``'s dtype.

    Raises:
        ValueError: shape/dtype/device mismatches, unknown ``loss_type`` or
            ``importance_level``, ``beta != 0`` without ``ref_logp``, adapter ids out of range,
            ``max_completion_length`` not an int >= 1 or smaller than L, a non-bool
            ``kl_correction``, a non-finite loss-type hyperparameter or a sapo temperature <= 0.
    """
    B, L, A, Lc = check_policy_loss_inputs(logp, old_logp, advantages, mask, adapter_ids, ref_logp,
                                           loss_type, eps_low, eps_high, delta, beta,
                                           importance_level, num_adapters, triton=True,
                                           max_completion_length=max_completion_length)
    opt = check_loss_options(kl_correction, sapo_temperature_pos, sapo_temperature_neg,
                             vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
    if B == 0 or A == 0:
        zeros = logp.sum() * 0.0 + logp.new_zeros((A,), dtype=torch.float32)
        return zeros, {k: torch.zeros((A,), device=logp.device) for k in METRIC_NAMES}
    surrogate = SURROGATE[loss_type]
    cfg = dict(lo=1.0 - eps_low, hi=1.0 + eps_high, cap=float(eps_high),
               delta=float(delta) if delta is not None and surrogate == "clip" else 0.0,
               has_delta=delta is not None and surrogate == "clip", beta=float(beta),
               has_kl=beta != 0, kl_corr=opt["kl_correction"], seq=importance_level == "sequence",
               surrogate=SURROGATES.index(surrogate), norm=NORMALISERS.index(NORMALISER[loss_type]),
               t_pos=opt["sapo_temperature_pos"], t_neg=opt["sapo_temperature_neg"],
               k_pos=opt["vespo_k_pos"], lam_pos=opt["vespo_lambda_pos"],
               k_neg=opt["vespo_k_neg"], lam_neg=opt["vespo_lambda_neg"],
               Lc=float(Lc))  # a float: n * Lc in fp32, and no int specialisation / overflow
    mask_f = mask if mask.dtype == torch.float32 else mask.to(torch.float32)
    losses, metrics = policy_loss_apply(
        logp.contiguous(), old_logp.contiguous(), ref_logp.contiguous() if ref_logp is not None else None,
        mask_f.contiguous(), advantages.contiguous(), adapter_ids.contiguous(), A, cfg)
    return losses, {k: metrics[i] for i, k in enumerate(METRIC_NAMES)}
