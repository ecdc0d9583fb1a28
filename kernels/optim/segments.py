"""Plain data of the fused AdamW over an adapter bank: where each adapter's elements sit in a
tensor (``Segments``) and the per-adapter coefficient table (``COEFS``), plus the input checks
shared by every path.

A bank buffer holds many adapters along one axis (rows of A [sum r, K], columns of B [N, sum r],
rows of DoRA's m [n, N], ...). Segment s of a tensor is the run of positions
[offsets[s], offsets[s] + sizes[s]) along that axis, owned by adapter slot ``slots[s]``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# Rows of the coefficient table ``coef`` [len(COEFS), 2, A] (fp32): per rate group (0: A-like at
# lr, 1: B-like at lr * LoRA+ ratio) and adapter slot, AdamW's per-step scalars, computed on the
# host in float64 exactly as torch.optim.AdamW does, then rounded to fp32 as its kernels round them:
#   active    1: step this slot now; 0: leave its weights and state untouched (skipped, not asked)
#   clip      min(1, max_norm / (||g|| + 1e-6)): the slot's gradient clipping factor
#   decay     1 - lr * weight_decay
#   w1        1 - beta1                      (exp_avg.lerp_(g, w1))
#   beta2, w2 beta2 and 1 - beta2            (exp_avg_sq * beta2 + w2 * g * g)
#   neg_step  -lr / (1 - beta1^step)
#   bc2_sqrt  sqrt(1 - beta2^step)
#   eps
COEFS = ("active", "clip", "decay", "w1", "beta2", "w2", "neg_step", "bc2_sqrt", "eps")


class Segments(NamedTuple):
    """Adapter segments of one tensor along ``axis`` (0 or 1); int64 tensors on its device."""

    axis: int
    offsets: torch.Tensor   # [S]
    sizes: torch.Tensor     # [S]
    slots: torch.Tensor     # [S] adapter slot of each segment
    owner: torch.Tensor     # [P] slot of each position along the axis (P = sum sizes)
    max_size: int           # host copy of max(sizes), 0 when S = 0


def make_segments(axis: int, offsets, sizes, slots, device) -> Segments:
    """``Segments`` from host lists (built once per bank layout, not per step)."""
    as_t = lambda v: torch.tensor(list(v), dtype=torch.int64).to(device)  # noqa: E731
    off, size, slot = as_t(offsets), as_t(sizes), as_t(slots)
    return Segments(axis, off, size, slot, torch.repeat_interleave(slot, size), max(sizes, default=0))


def split_dims(shape, axis: int) -> tuple[int, int, int]:
    """(outer, P, inner) of a contiguous tensor seen as [outer, P, inner] with P its adapter axis."""
    outer = 1
    for d in shape[:axis]:
        outer *= d
    inner = 1
    for d in shape[axis + 1:]:
        inner *= d
    return outer, shape[axis], inner


def check_sumsq_inputs(grads, segs, num_slots: int) -> None:
    if len(grads) != len(segs):
        raise ValueError(f"{len(grads)} gradients but {len(segs)} segment tables: give one Segments per tensor")
    for j, (g, s) in enumerate(zip(grads, segs)):
        if g is None:
            continue
        if s.axis not in (0, 1) or g.dim() <= s.axis:
            raise ValueError(f"tensor {j}: adapter axis {s.axis} does not exist in shape {tuple(g.shape)}")
        if s.owner.numel() != g.shape[s.axis]:
            raise ValueError(f"tensor {j}: segments cover {s.owner.numel()} positions but its axis {s.axis} has "
                             f"{g.shape[s.axis]}: rebuild the segments for this layout")
        if s.slots.numel() and int(s.slots.max()) >= num_slots:
            raise ValueError(f"tensor {j}: segment slot {int(s.slots.max())} >= num_slots={num_slots}")


def check_update_inputs(params, grads, exp_avgs, exp_avg_sqs, segs, groups, coef) -> None:
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == len(segs) == len(groups) == n):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs, segs and groups must have one entry per tensor")
    if coef.dim() != 3 or coef.shape[0] != len(COEFS) or coef.shape[1] != 2 or coef.dtype != torch.float32:
        raise ValueError(f"coef must be fp32 [{len(COEFS)}, 2, num_slots] (rows {COEFS}); got "
                         f"{coef.dtype} {tuple(coef.shape)}")
    check_sumsq_inputs(grads, segs, coef.shape[2])
    for j, (p, g, m, v, grp) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, groups)):
        if g is None:
            continue
        if not (p.shape == g.shape == m.shape == v.shape):
            raise ValueError(f"tensor {j}: param {tuple(p.shape)}, grad {tuple(g.shape)}, exp_avg {tuple(m.shape)} "
                             f"and exp_avg_sq {tuple(v.shape)} must have one shape")
        if any(t.dtype != torch.float32 for t in (p, g, m, v)):
            raise ValueError(f"tensor {j}: the fused AdamW keeps fp32 master weights, grads and state; got "
                             f"{p.dtype}/{g.dtype}/{m.dtype}/{v.dtype}: keep the bank in fp32 (adapter_dtype)")
        if grp not in (0, 1):
            raise ValueError(f"tensor {j}: group must be 0 (lr) or 1 (lr * LoRA+ ratio), got {grp}")
