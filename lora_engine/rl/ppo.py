"""PPO's critic-side math, per adapter: token rewards, the KL penalty in the reward, GAE,
returns, whitening and the clipped value loss (verl's definitions, ``trainer/ppo/core_algos.py``).

All per-token tensors are ``[B, L]`` over completion tokens with ``mask [B, L]`` (1 = a
generated token). Every statistic that spans rows (whitening, loss aggregation) runs over one
adapter's rows only (``adapter_ids [B]``), so adding another adapter's sequences never changes
an adapter's advantages or its critic's loss. Computed in float64, returned in float32.

    r_t      = score_b [t = last valid token] - beta * kl_t              (KL in the reward)
    kl_t     = logp_t - ref_t ("kl", k1) | |.| ("abs") | 0.5 (.)^2 ("mse") | k3 in [-10, 10] ("low_var_kl")
    delta_t  = r_t + gamma * V_next(t) - V_t,  V_next(t) = V of the next valid token (0 at the end)
    A_t      = delta_t + gamma * lam * A_next(t)                         (GAE; skips masked positions)
    R_t      = A_t + V_t                                                  (the critic's target)
    A_hat    = (A - mean_a) / sqrt(var_a + 1e-8), var_a Bessel-corrected  (per adapter a)
    L_V(a)   = 0.5 * mean_{a's tokens} max((V' - R)^2, (clip(V', V - c, V + c) - R)^2)
"""
from __future__ import annotations

import torch

KL_KINDS = ("kl", "abs", "mse", "low_var_kl")


def _check(x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 2 or mask.shape != x.shape:
        raise ValueError(f"{name} must be [B, L] like the mask {tuple(mask.shape)}, got {tuple(x.shape)}")
    return mask.to(x.device, torch.float64)


def outcome_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L] rewards with each sequence's score on its last valid token (verl's reward manager);
    a row without valid tokens gets none."""
    m = mask.bool()
    if scores.shape != (m.shape[0],):
        raise ValueError(f"scores must be [B]=[{m.shape[0]}], one per sequence, got {tuple(scores.shape)}")
    last = torch.where(m.any(1), m.shape[1] - 1 - m.flip(1).long().argmax(1), torch.full_like(m[:, 0], -1, dtype=torch.long))
    out = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    rows = (last >= 0).nonzero().squeeze(1)
    out[rows, last[rows]] = scores.to(out)[rows.to(scores.device)]
    return out


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-token KL estimate of the policy to the reference (verl's ``kl_penalty``), fp64."""
    if kind not in KL_KINDS:
        raise ValueError(f"unknown kl kind {kind!r}: use one of {KL_KINDS}")
    d = logp.double() - ref_logp.double()
    if kind == "kl":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d.square()
    # k3 of the reference to the policy, clamped as verl does against exp overflow.
    return (torch.exp(-d) - 1 + d).clamp(-10.0, 10.0)


def kl_in_reward(rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                 beta: float, kind: str = "kl") -> torch.Tensor:
    """``rewards - beta * kl`` on valid tokens (verl / OpenRLHF's KL penalty in the reward)."""
    m = _check(rewards, mask, "rewards")
    return (rewards.double() - beta * kl_penalty(logp, ref_logp, kind) * m).float()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, L] float32, before whitening; 0 advantage and return on masked
    positions, which the recurrence skips (a value or TD error there never leaks in)."""
    m = _check(rewards, mask, "rewards")
    _check(values, mask, "values")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got gamma={gamma}, lam={lam}")
    r, v = rewards.double(), values.double() * m
    B, L = r.shape
    next_v = r.new_zeros(B)
    last = r.new_zeros(B)
    adv = torch.zeros_like(r)
    for t in range(L - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        cand = delta + gamma * lam * last
        next_v = torch.where(m[:, t] > 0, v[:, t], next_v)
        last = torch.where(m[:, t] > 0, cand, last)
        adv[:, t] = last
    adv = adv * m
    return adv.float(), ((adv + v) * m).float()


def whiten(x: torch.Tensor, mask: torch.Tensor, adapter_ids: torch.Tensor, num_adapters: int,
           shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """verl's ``masked_whiten`` over each adapter's valid tokens (Bessel-corrected variance);
    an adapter with fewer than 2 tokens is only centred. 0 on masked positions."""
    m = _check(x, mask, "x")
    ids = adapter_ids.to(x.device, torch.long)
    A = int(num_adapters)
    xd = x.double() * m
    n = m.new_zeros(A).index_add(0, ids, m.sum(1))
    s = m.new_zeros(A).index_add(0, ids, xd.sum(1))
    mean = s / n.clamp(min=1)
    centred = (x.double() - mean[ids][:, None]) * m
    var = m.new_zeros(A).index_add(0, ids, centred.square().sum(1)) / n.clamp(min=1)
    var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), torch.full_like(var, 1.0 - eps))
    out = centred * torch.rsqrt(var + eps)[ids][:, None]
    if not shift_mean:
        out = out + mean[ids][:, None]
    return (out * m).float()


def value_loss(vpreds: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               adapter_ids: torch.Tensor, num_adapters: int, clip: float | None = 0.2):
    """Per-adapter clipped value loss ``[A]`` (differentiable in ``vpreds``) and clip fraction ``[A]``.

    ``clip`` None: the plain squared error. Token-mean per adapter (verl's default ``token-mean``).
    """
    m = _check(vpreds, mask, "vpreds")
    ids = adapter_ids.to(vpreds.device, torch.long)
    A = int(num_adapters)
    v, old, ret = vpreds.double(), old_values.double(), returns.double()
    l1 = (v - ret).square()
    if clip is None:
        per_tok, clipped = l1, torch.zeros_like(l1)
    else:
        if not clip > 0:
            raise ValueError(f"value_clip must be > 0 or None, got {clip}")
        l2 = (old + (v - old).clamp(-clip, clip) - ret).square()
        per_tok, clipped = torch.maximum(l1, l2), (l2 > l1).double()
    n = m.new_zeros(A).index_add(0, ids, m.sum(1)).clamp(min=1)
    loss = 0.5 * m.new_zeros(A).index_add(0, ids, (per_tok * m).sum(1)) / n
    frac = m.new_zeros(A).index_add(0, ids, (clipped * m).sum(1)) / n
    return loss.float(), frac.float()
