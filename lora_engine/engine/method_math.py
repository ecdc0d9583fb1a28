"""Shared math of the methods table (``methods.py`` re-exports every name): VeRA's projections
and DoRA's column norms, one adapter at a time and many at once."""
from __future__ import annotations

import math

import torch


def kaiming_uniform(shape, generator: torch.Generator) -> torch.Tensor:
    """PEFT VeRA's ``_kaiming_init``: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(shape[1])."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(rank: int, key: int, n_max: int, k_max: int):
    """The shared frozen (A_v [r, K_max], B_v [N_max, r]) exactly as PEFT's VeraModel draws them."""
    gen = torch.Generator(device="cpu").manual_seed(key)
    a = kaiming_uniform((rank, k_max), gen)
    return a, kaiming_uniform((n_max, rank), gen)


def column_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """||W[n, :]||^2 for every output n, fp32 [N] (DoRA's "column" norm in PEFT's [N, K] layout)."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()


def dora_norm(weight, lora_a, lora_b, scale: float, w_sq) -> torch.Tensor:
    """||W + s B A||_c, fp32 [N], no gradient (PEFT detaches it).

    Expanded as ||W_n||^2 + 2 s <W_n, (BA)_n> + s^2 ||(BA)_n||^2 with ``w_sq`` = ||W_n||^2 cached:
    costs N K r, like PEFT's, but never materialises [N, K] (235 MB in fp32 for a 4096 x 14336
    projection). With B = 0 (init) it is exactly sqrt(w_sq), so g = m / norm is exactly 1.
    """
    with torch.no_grad():
        a, b = lora_a.float(), lora_b.float()
        cross = ((weight @ lora_a.to(weight.dtype).T).float() * b).sum(1)
        ba_sq = ((b @ (a @ a.T)) * b).sum(1)
        return (w_sq + 2.0 * scale * cross + scale * scale * ba_sq).clamp_min(0.0).sqrt()


def dora_norms(weight, lora_a, lora_b, scales, buckets, w_sq) -> torch.Tensor:
    """``dora_norm`` of n adapters at once, fp32 [n, N], no gradient.

    lora_a [R, K], lora_b [N, R]: the adapters' rows and columns stacked; scales fp32 [n];
    buckets: one ``(idx [n_r * r] rank rows, which [n_r] adapters)`` per distinct rank r, so the
    loop runs over ranks (a handful), never over adapters: a bucket's A is a [n_r, r, K] batch.
    """
    with torch.no_grad():
        a, b = lora_a.float(), lora_b.float()
        wa = (weight @ lora_a.to(weight.dtype).T).float()
        N, n = b.shape[0], scales.numel()
        cross, ba_sq = b.new_zeros(N, n), b.new_zeros(N, n)
        for idx, which in buckets:
            r = idx.numel() // which.numel()
            a_r = a.index_select(0, idx).view(-1, r, a.shape[1])
            b_r = b.index_select(1, idx).view(N, -1, r)
            cross.index_copy_(1, which, (wa.index_select(1, idx).view(N, -1, r) * b_r).sum(-1))
            gram = a_r @ a_r.transpose(1, 2)
            ba_sq.index_copy_(1, which, (torch.einsum("nar,ars->nas", b_r, gram) * b_r).sum(-1))
        s = scales[None, :]
        return (w_sq[:, None] + 2.0 * s * cross + s * s * ba_sq).clamp_min(0.0).sqrt().T
