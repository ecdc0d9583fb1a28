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


# --- log-probs and policy loss -----------------------------------------------------------

def token_logprobs(hidden, lm_head_weight, targets, temperature=1.0, return_entropy=False):
    """Per-token log-prob (and entropy) from hidden states, no [T, V] logits on the GPU path."""
    from lora_engine.kernels import logprobs

    fn = logprobs.token_logprobs_triton if use_triton(hidden) else logprobs.token_logprobs_naive
    return fn(hidden, lm_head_weight, targets, temperature=temperature,
              return_entropy=return_entropy)


def policy_loss(logp, old_logp, advantages, mask, adapter_ids, ref_logp=None,
                loss_type="dapo", eps_low=0.2, eps_high=0.2, delta=None, beta=0.0,
                importance_level="token", num_adapters=None):
    """Clipped surrogate + k3 KL, aggregated per adapter. Returns (losses [A], metrics dict)."""
    from lora_engine.kernels import policy_loss as pl

    fn = pl.policy_loss_triton if use_triton(logp) else pl.policy_loss_naive
    return fn(logp, old_logp, advantages, mask, adapter_ids, ref_logp=ref_logp,
              loss_type=loss_type, eps_low=eps_low, eps_high=eps_high, delta=delta,
              beta=beta, importance_level=importance_level, num_adapters=num_adapters)
