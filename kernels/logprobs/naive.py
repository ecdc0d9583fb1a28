"""Reference per-token log-probs and entropy: full logits, log_softmax, gather. The spec.

    z = (h @ W^T) / temperature          [T, V]
    logp[t] = z[t, y_t] - logsumexp(z[t])
    H[t]    = logsumexp(z[t]) - sum_v softmax(z[t])_v z[t, v]

Computes in fp32 (fp64 when ``hidden`` is fp64) and materialises the [T, V] logits: this is
the CPU path and the test oracle, not the memory-efficient one.
"""
from __future__ import annotations

import torch

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_logprobs_inputs(hidden, lm_head_weight, targets, temperature, triton):
    """Validate shapes, dtypes and devices; return (leading shape, d, V). Shared by both paths."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or not hidden.is_floating_point():
        raise ValueError("hidden must be a floating tensor [*, d]; pass the final hidden states")
    if not isinstance(lm_head_weight, torch.Tensor) or lm_head_weight.dim() != 2:
        raise ValueError("lm_head_weight must be [V, d]; pass model.lm_head.weight (not transposed)")
    d = hidden.shape[-1]
    V = lm_head_weight.shape[0]
    if lm_head_weight.shape[1] != d:
        raise ValueError(f"lm_head_weight is {tuple(lm_head_weight.shape)} but hidden has d={d}; "
                         "lm_head_weight must be [V, d] (not transposed)")
    if lm_head_weight.dtype != hidden.dtype:
        raise ValueError(f"lm_head_weight is {lm_head_weight.dtype} but hidden is {hidden.dtype}; "
                         "cast one to the other's dtype")
    if triton and hidden.dtype not in _TRITON_DTYPES:
        raise ValueError(f"the Triton path takes fp16/bf16/fp32, got {hidden.dtype}; "
                         "use token_logprobs_naive for float64")
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.is_complex() \
            or targets.dtype == torch.bool:
        raise ValueError("targets must be an integer tensor of token ids; use targets.long()")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets is {tuple(targets.shape)} but hidden is {tuple(hidden.shape)}; "
                         "targets must have hidden's shape without the last dim")
    if lm_head_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("lm_head_weight requires grad, but the LM head is frozen by contract (the "
                         "fused path never computes its gradient); pass lm_head_weight.detach()")
    if hidden.device != lm_head_weight.device or hidden.device != targets.device:
        raise ValueError("hidden, lm_head_weight and targets must be on one device; move them with .to()")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use 1.0 for plain logits")
    if V == 0:
        raise ValueError("lm_head_weight has V=0 rows; pass the real LM head")
    if targets.numel():
        msg = (f"targets must be in [0, {V}); replace padding/ignore ids (e.g. -100) with 0 "
               "and mask those tokens out of the loss")
        in_range = ((targets >= 0) & (targets < V)).all()
        if torch.compiler.is_compiling():
            # Reading the answer on the host would break the compiled graph (and no CUDA graph
            # can hold a host sync): assert on the device instead.
            torch._assert_async(in_range, msg)
        elif not bool(in_range):
            raise ValueError(msg)
    return hidden.shape[:-1], d, V


def token_logprobs_naive(hidden, lm_head_weight, targets, temperature=1.0, return_entropy=False):
    """Per-token log-prob of ``targets`` (and entropy) under logits ``hidden @ W^T / temperature``.

    Args:
        hidden: [*, d] fp16/bf16/fp32/fp64 final hidden states.
        lm_head_weight: [V, d], same dtype and device as ``hidden``; frozen: it must not
            require grad (pass ``lm_head_weight.detach()``).
        targets: [*] integer token ids in [0, V).
        temperature: float > 0; divides the logits.
        return_entropy: also return the entropy of the softmax.

    Returns:
        ``logp`` [*] fp32 (fp64 for fp64 inputs), or ``(logp, entropy)`` when
        ``return_entropy``. Differentiable w.r.t. ``hidden`` (and the entropy too).
    """
    lead, d, V = check_logprobs_inputs(hidden, lm_head_weight, targets, temperature, triton=False)
    ct = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden.reshape(-1, d).to(ct) @ lm_head_weight.to(ct).t()) / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(1, targets.reshape(-1, 1).long()).squeeze(1).reshape(lead)
    if not return_entropy:
        return logp
    entropy = -(logsm.exp() * logsm).sum(-1).reshape(lead)
    return logp, entropy
