"""Fused AdamW over an adapter bank, vectorised PyTorch: the CPU path.

Each tensor is updated by a handful of whole-tensor ops whatever the number of adapters in it:
the per-adapter coefficients are gathered once per position along the adapter axis and
broadcast over the other axis. The operations and their rounding are the reference's
(``naive.py``, i.e. torch.optim.AdamW's), with tensors where it has scalars.
"""
from __future__ import annotations

import torch

from .segments import COEFS, check_sumsq_inputs, check_update_inputs


def segment_sumsq_torch(grads, segs, num_slots: int) -> torch.Tensor:
    """Same contract as ``segment_sumsq_naive``: per tensor, squares summed over the non-adapter
    axes, then added into their slots (index_add, sequential on a CPU)."""
    check_sumsq_inputs(grads, segs, num_slots)
    device = next((g.device for g in grads if g is not None), torch.device("cpu"))
    out = torch.zeros(num_slots, dtype=torch.float32, device=device)
    for g, seg in zip(grads, segs):
        if g is None or seg.owner.numel() == 0:
            continue
        dims = [d for d in range(g.dim()) if d != seg.axis]
        sq = g.float().square()
        out.index_add_(0, seg.owner, sq.sum(dims) if dims else sq)
    return out


@torch.no_grad()
def adamw_update_torch(params, grads, exp_avgs, exp_avg_sqs, segs, groups, coef) -> None:
    """Same contract as ``adamw_update_naive``."""
    check_update_inputs(params, grads, exp_avgs, exp_avg_sqs, segs, groups, coef)
    for p, g, m, v, seg, grp in zip(params, grads, exp_avgs, exp_avg_sqs, segs, groups):
        if g is None or seg.owner.numel() == 0:
            continue
        shape = [1] * p.dim()
        shape[seg.axis] = -1
        c = coef[:, grp].index_select(1, seg.owner).view(len(COEFS), *shape)
        active, clip, decay, w1, beta2, w2, neg_step, bc2_sqrt, eps = c
        gc = g * clip
        p_new = p * decay
        m_new = torch.lerp(m, gc, w1.expand_as(m))
        v_new = v * beta2 + (w2 * gc) * gc
        p_new = p_new + (neg_step * m_new) / (v_new.sqrt() / bc2_sqrt + eps)
        if not bool((active != 0).all()):  # a skipped slot's weights and state stay as they are (its g may be NaN)
            on = (active != 0).expand_as(p)
            p_new, m_new, v_new = torch.where(on, p_new, p), torch.where(on, m_new, m), torch.where(on, v_new, v)
        p.copy_(p_new)
        m.copy_(m_new)
        v.copy_(v_new)
