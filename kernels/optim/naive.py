"""Fused AdamW over an adapter bank, fp32 PyTorch reference: the spec.

One adapter segment at a time, with exactly the operations (and the order of rounding) of
``torch.optim.AdamW``'s single-tensor step on that adapter's slice, its scalars read from the
coefficient table (``segments.COEFS``) as Python floats:

    g = grad * clip;  p *= decay;  m.lerp_(g, w1);  v = v * beta2 + w2 * g * g
    p += neg_step * m / (sqrt(v) / bc2_sqrt + eps)

Slots whose ``active`` is 0 and tensors whose grad is None are left untouched.
"""
from __future__ import annotations

import torch

from .segments import COEFS, check_sumsq_inputs, check_update_inputs


def segment_sumsq_naive(grads, segs, num_slots: int) -> torch.Tensor:
    """[num_slots] fp32: each slot's sum of squared gradient elements over every tensor (its
    gradient norm squared); slots with no segment get 0."""
    check_sumsq_inputs(grads, segs, num_slots)
    device = next((g.device for g in grads if g is not None), torch.device("cpu"))
    out = torch.zeros(num_slots, dtype=torch.float32, device=device)
    for g, seg in zip(grads, segs):
        if g is None:
            continue
        for off, size, slot in zip(seg.offsets.tolist(), seg.sizes.tolist(), seg.slots.tolist()):
            out[slot] += g.narrow(seg.axis, off, size).float().square().sum()
    return out


@torch.no_grad()
def adamw_update_naive(params, grads, exp_avgs, exp_avg_sqs, segs, groups, coef) -> None:
    """One AdamW step of every active slot, in place (same contract as ``adamw_update_triton``)."""
    check_update_inputs(params, grads, exp_avgs, exp_avg_sqs, segs, groups, coef)
    table = coef.cpu().tolist()
    row = {name: k for k, name in enumerate(COEFS)}
    for p, g, m, v, seg, grp in zip(params, grads, exp_avgs, exp_avg_sqs, segs, groups):
        if g is None:
            continue
        for off, size, slot in zip(seg.offsets.tolist(), seg.sizes.tolist(), seg.slots.tolist()):
            c = {name: table[k][grp][slot] for name, k in row.items()}
            if not c["active"]:
                continue
            ps, ms, vs = (t.narrow(seg.axis, off, size) for t in (p, m, v))
            gs = g.narrow(seg.axis, off, size).mul(c["clip"])
            ps.mul_(c["decay"])
            ms.lerp_(gs, c["w1"])
            vs.mul_(c["beta2"]).addcmul_(gs, gs, value=c["w2"])
            ps.addcdiv_(ms, (vs.sqrt() / c["bc2_sqrt"]).add_(c["eps"]), value=c["neg_step"])
