"""The public functional API (``le.ops.*``).

This is the only module that decides which implementation runs: the Triton kernels when the
inputs live on a CUDA device and Triton imports, the naive fp32 PyTorch reference otherwise.
``LORA_ENGINE_BACKEND=naive|triton`` overrides the choice (naive: debugging on a GPU; triton:
tests on a CPU under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken on this platform
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA tensors, the naive reference everywhere else (unless overridden)."""
    backend = os.environ.get("LORA_ENGINE_BACKEND", "")
    if backend not in ("", "naive", "triton"):
        raise ValueError(f"LORA_ENGINE_BACKEND={backend!r}: use 'naive', 'triton' or leave it unset")
    if backend:
        return backend == "triton"
    return t.is_cuda and triton_available()


# --- multi-adapter LoRA -----------------------------------------------------------------

def lora_linear(x, weight, bias, lora_a, lora_b, layout, routing):
    """``y = x W^T + b + s_a (x A_a^T) B_a^T`` for each token of adapter ``a``.

    See ``lora_engine.kernels.lora.triton_lora.lora_linear_triton`` for shapes and dtypes.
    """
    from lora_engine.kernels import lora

    fn = lora.lora_linear_triton if use_triton(x) else lora.lora_linear_naive
    return fn(x, weight, bias, lora_a, lora_b, layout, routing)


def lora_column_scale(y, bias, scale, scaled, routing):
    """DoRA's epilogue: ``out[t] = y[t] + (scale[a] - 1) * (y[t] - bias)`` on the rows of every
    adapter ``a`` with ``scaled[a]``. See ``lora_engine.kernels.lora.triton_dora`` for shapes."""
    from lora_engine.kernels import lora

    fn = lora.lora_column_scale_triton if use_triton(y) else lora.lora_column_scale_naive
    return fn(y, bias, scale, scaled, routing)


# --- fused AdamW over an adapter bank -----------------------------------------------------

def segment_sumsq(grads, segs, num_slots):
    """[num_slots] fp32: per adapter slot, the sum of its squared gradient elements over every tensor.

    ``grads``: one tensor per bank buffer (None: skipped); ``segs``: one
    ``kernels.optim.Segments`` per tensor. Triton on CUDA tensors, vectorised PyTorch elsewhere
    (``kernels.optim.naive`` is the spec the tests hold both to).
    """
    from lora_engine.kernels import optim

    first = next((g for g in grads if g is not None), None)
    fn = optim.segment_sumsq_triton if first is not None and use_triton(first) else optim.segment_sumsq_torch
    return fn(grads, segs, num_slots)


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, segs, groups, coef):
    """One AdamW step of every active adapter slot, in place, each with its own coefficients
    (``coef`` [len(COEFS), 2, A] fp32, ``kernels.optim.segments.COEFS``). See
    ``lora_engine.kernels.optim.triton_adamw.adamw_update_triton`` for shapes and dtypes."""
    from lora_engine.kernels import optim

    fn = optim.adamw_update_triton if params and use_triton(params[0]) else optim.adamw_update_torch
    return fn(params, grads, exp_avgs, exp_avg_sqs, segs, groups, coef)


# --- log-probs and policy loss -----------------------------------------------------------

def token_logprobs(hidden, lm_head_weight, targets, temperature=1.0, return_entropy=False):
    """Per-token log-prob (and entropy) from hidden states, no [T, V] logits on the GPU path."""
    from lora_engine.kernels import logprobs

    fn = logprobs.token_logprobs_triton if use_triton(hidden) else logprobs.token_logprobs_naive
    return fn(hidden, lm_head_weight, targets, temperature=temperature,
              return_entropy=return_entropy)


def masked_token_logprobs(hidden, lm_head_weight, targets, mask, temperature=1.0, return_entropy=False):
    """``token_logprobs`` of the positions with ``mask != 0`` only, scattered back to [B, L].

    hidden [B, L, d], targets and mask [B, L]. Only kept rows go through the LM head, so padding
    costs no [*, V] GEMM (and padded positions may hold any target id); they hold 0 in the
    result (entropy too). Returns logp [B, L] fp32, or (logp, entropy) with ``return_entropy``.
    """
    B, L, d = hidden.shape
    idx = (mask != 0).reshape(-1).nonzero().squeeze(1).to(hidden.device)
    res = token_logprobs(hidden.reshape(-1, d).index_select(0, idx), lm_head_weight,
                         targets.reshape(-1).to(hidden.device).index_select(0, idx),
                         temperature=temperature, return_entropy=return_entropy)
    res = res if return_entropy else (res,)
    full = tuple(r.new_zeros(B * L).index_put((idx,), r).view(B, L) for r in res)
    return full if return_entropy else full[0]


def policy_loss(logp, old_logp, advantages, mask, adapter_ids, ref_logp=None,
                loss_type="dapo", eps_low=0.2, eps_high=0.2, delta=None, beta=0.0,
                importance_level="token", num_adapters=None, max_completion_length=None,
                kl_correction=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    """Per-adapter policy loss (TRL 1.16's loss types) + KL. Returns (losses [A], metrics dict).

    ``loss_type``: one of ``lora_engine.kernels.policy_loss.LOSS_TYPES`` (grpo, bnpo, dr_grpo,
    dapo, cispo, sapo, luspo, vespo), each normalised over the adapter's own tokens/sequences.
    ``max_completion_length``: dr_grpo divides each adapter's summed loss by
    ``num_sequences_a * max_completion_length`` (TRL's definition); pass your generation cap
    (e.g. ``max_new_tokens``). Defaulting to the padded width L makes dr_grpo depend on the
    batch's longest completion, i.e. on other adapters. Must be >= L. ``kl_correction``: TRL's
    ``use_bias_correction_kl`` (k3 times the importance ratio; TRL's default), else plain k3.
    ``sapo_*``/``vespo_*``: TRL's GRPOConfig fields of those loss types. See
    ``lora_engine.kernels.policy_loss.naive`` for every formula and the other arguments.
    """
    from lora_engine.kernels import policy_loss as pl

    fn = pl.policy_loss_triton if use_triton(logp) else pl.policy_loss_naive
    return fn(logp, old_logp, advantages, mask, adapter_ids, ref_logp=ref_logp,
              loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, delta=delta,
              beta=beta, importance_level=importance_level, num_adapters=num_adapters,
              max_completion_length=max_completion_length, kl_correction=kl_correction,
              sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
              vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
              vespo_lambda_neg=vespo_lambda_neg)


# --- fused: hidden states -> policy loss -------------------------------------------------

def fused_policy_loss_from_hidden(hidden, lm_head_weight, targets, old_logp, advantages, mask,
                                  adapter_ids, ref_logp=None, loss_type="dapo", eps_low=0.2,
                                  eps_high=0.2, delta=None, beta=0.0, importance_level="token",
                                  num_adapters=None, max_completion_length=None, temperature=1.0,
                                  **loss_options):
    """Per-adapter policy loss straight from the final hidden states, no logits stored.

    ``token_logprobs`` then ``policy_loss``. On the Triton path the forward keeps two fp32
    numbers per token for the backward (row max and log-sum-exp of the logits), never the
    [B, L, V] logits, and the backward goes loss -> dlogp -> dhidden by recomputing logits in
    vocabulary tiles (the CPU reference path does hold the logits). Only
    tokens with ``mask != 0`` go through the LM head, so padding costs no GEMM (and padded
    positions may hold any target id).

    Args:
        hidden: [B, L, d] fp16/bf16/fp32 hidden states; ``hidden[b, l]`` predicts ``targets[b, l]``.
        lm_head_weight: [V, d], hidden's dtype, frozen (must not require grad).
        targets: [B, L] integer token ids, in [0, V) wherever ``mask != 0``.
        old_logp, advantages, mask, adapter_ids, ref_logp, loss_type, eps_low, eps_high, delta,
        beta, importance_level, num_adapters, max_completion_length: as in ``policy_loss``
        ([B, L] / [B]); pass ``max_completion_length`` (the generation cap) with dr_grpo.
        temperature: float > 0 dividing the logits (the sampling temperature).
        loss_options: ``policy_loss``'s ``kl_correction``, ``sapo_*`` and ``vespo_*``.

    Returns:
        ``(losses [A] fp32, metrics)`` as ``policy_loss``; ``losses.sum().backward()`` fills
        ``hidden.grad`` ([B, L, d], hidden's dtype).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError("hidden must be [B, L, d]; reshape the completion hidden states")
    B, L = hidden.shape[:2]
    for name, t in (("targets", targets), ("mask", mask), ("old_logp", old_logp)):
        if not isinstance(t, torch.Tensor) or t.shape != (B, L):
            raise ValueError(f"{name} must be [B, L]=[{B}, {L}] like hidden's first two dims, got "
                             f"{getattr(t, 'shape', type(t))}")
    # Masked-out positions hold 0: the policy loss reads them as log-ratio 0 and weight 0.
    logp = masked_token_logprobs(hidden, lm_head_weight, targets, mask, temperature=temperature)
    return policy_loss(logp, old_logp, advantages, mask, adapter_ids, ref_logp=ref_logp,
                       loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, delta=delta,
                       beta=beta, importance_level=importance_level, num_adapters=num_adapters,
                       max_completion_length=max_completion_length, **loss_options)
