"""Fused AdamW over an adapter bank in Triton: a segmented sum of squares (per-adapter gradient
norms) and one elementwise update per tensor, whatever the number of adapters in it.

    partial[s, c] = sum_{e in chunk c of segment s} g[e]^2        (one program per (segment, chunk))
    norm_sq[slot] = sum_tensors sum_c partial[s, c]               (in order: deterministic, no atomics
                                                                   on a slot within one tensor)
    update (each element e at position p of the adapter axis, slot a = owner[p], its table column):
        g = grad * clip;  p *= decay;  m += w1 (g - m);  v = v * beta2 + (w2 g) g
        p += neg_step * m / (sqrt(v) / bc2_sqrt + eps)           (sqrt and divisions rounded to
                                                                   nearest, as torch's CUDA kernels)

A segment of rank r in an [outer, P, inner] tensor is ``outer`` runs of r * inner contiguous
elements; chunks of 65,536 elements give a rank-512 A row block of a 14336-wide projection 112
programs instead of one (segments smaller than a chunk exit after their first).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .segments import check_sumsq_inputs, check_update_inputs, split_dims

CHUNK = 65536
BLOCK = 1024


@triton.jit
def _sumsq_kernel(g_ptr, off_ptr, size_ptr, part_ptr, P, INNER, OUTER, N_CHUNKS,
                  CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """partial[s, c] = sum of g^2 over elements [c * CHUNK, (c + 1) * CHUNK) of segment s."""
    s = tl.program_id(0)
    c = tl.program_id(1)
    off = tl.load(off_ptr + s).to(tl.int64)
    run = tl.load(size_ptr + s).to(tl.int64) * INNER
    total = run * OUTER
    start = c.to(tl.int64) * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # Loops to the segment's end, not the chunk's: a rank-1 segment of a 64-wide A is one block.
    for k in range(0, tl.minimum(CHUNK, total - start), BLOCK):
        idx = start + k + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < total
        addr = (idx // run) * P * INNER + off * INNER + idx % run
        x = tl.load(g_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(part_ptr + s * N_CHUNKS + c, tl.sum(acc, 0))


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, owner_ptr, coef_ptr, numel, P, INNER, ROW, GROUP_OFF,
                  BLOCK: tl.constexpr):
    """One AdamW step of the elements [pid * BLOCK, (pid + 1) * BLOCK) whose slot is active."""
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = idx < numel
    slot = tl.load(owner_ptr + (idx // INNER) % P, mask=mask, other=0)
    col = coef_ptr + GROUP_OFF + slot          # coef [9, 2, A]: row k of this group at k * ROW
    on = mask & (tl.load(col, mask=mask, other=0.0) != 0.0)
    clip = tl.load(col + 1 * ROW, mask=on, other=0.0)
    decay = tl.load(col + 2 * ROW, mask=on, other=0.0)
    w1 = tl.load(col + 3 * ROW, mask=on, other=0.0)
    beta2 = tl.load(col + 4 * ROW, mask=on, other=0.0)
    w2 = tl.load(col + 5 * ROW, mask=on, other=0.0)
    neg_step = tl.load(col + 6 * ROW, mask=on, other=0.0)
    bc2_sqrt = tl.load(col + 7 * ROW, mask=on, other=1.0)
    eps = tl.load(col + 8 * ROW, mask=on, other=1.0)
    g = tl.load(g_ptr + idx, mask=on, other=0.0) * clip
    p = tl.load(p_ptr + idx, mask=on, other=0.0) * decay
    m = tl.load(m_ptr + idx, mask=on, other=0.0)
    v = tl.load(v_ptr + idx, mask=on, other=0.0)
    # torch.lerp's two forms (|w| < 0.5 from the start, else from the end), as its kernels pick them.
    m = tl.where(w1 < 0.5, m + w1 * (g - m), g - (g - m) * (1.0 - w1))
    v = v * beta2 + (w2 * g) * g
    p = p + tl.div_rn(neg_step * m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
    tl.store(p_ptr + idx, p, mask=on)
    tl.store(m_ptr + idx, m, mask=on)
    tl.store(v_ptr + idx, v, mask=on)


def segment_sumsq_triton(grads, segs, num_slots: int) -> torch.Tensor:
    """Same contract as ``segment_sumsq_naive``: [num_slots] fp32 per-slot sums of squares."""
    check_sumsq_inputs(grads, segs, num_slots)
    device = next((g.device for g in grads if g is not None), torch.device("cpu"))
    out = torch.zeros(num_slots, dtype=torch.float32, device=device)
    for g, seg in zip(grads, segs):
        if g is None or seg.slots.numel() == 0:
            continue
        g = g.contiguous()
        outer, P, inner = split_dims(g.shape, seg.axis)
        n_chunks = triton.cdiv(outer * seg.max_size * inner, CHUNK)
        part = torch.empty(seg.slots.numel(), n_chunks, dtype=torch.float32, device=device)
        _sumsq_kernel[(seg.slots.numel(), n_chunks)](g, seg.offsets, seg.sizes, part, P, inner, outer, n_chunks,
                                                     CHUNK=CHUNK, BLOCK=BLOCK)
        # Slots are distinct within one tensor, so each index_add_ adds one term per slot.
        out.index_add_(0, seg.slots, part.sum(1))
    return out


@torch.no_grad()
def adamw_update_triton(params, grads, exp_avgs, exp_avg_sqs, segs, groups, coef) -> None:
    """One AdamW step of every active slot, in place.

    Args:
        params, exp_avgs, exp_avg_sqs: fp32 tensors (a non-contiguous view is updated through a
            contiguous copy), one per bank buffer (or a selection of its adapters).
        grads: fp32, the params' shapes; None skips that tensor.
        segs: one ``Segments`` per tensor. groups: 0 (lr) or 1 (lr * LoRA+ ratio) per tensor.
        coef: fp32 [len(COEFS), 2, num_slots] on the tensors' device (``segments.COEFS``).
    Raises ValueError on mismatched shapes, dtypes or segment tables.
    """
    check_update_inputs(params, grads, exp_avgs, exp_avg_sqs, segs, groups, coef)
    coef = coef.contiguous()
    A = coef.shape[2]
    for p, g, m, v, seg, grp in zip(params, grads, exp_avgs, exp_avg_sqs, segs, groups):
        if g is None or p.numel() == 0:
            continue
        work = [t if t.is_contiguous() else t.contiguous() for t in (p, m, v)]
        outer, P, inner = split_dims(p.shape, seg.axis)
        _adamw_kernel[(triton.cdiv(p.numel(), BLOCK),)](work[0], g.contiguous(), work[1], work[2], seg.owner, coef,
                                                        p.numel(), P, inner, 2 * A, grp * A, BLOCK=BLOCK)
        for t, w in zip((p, m, v), work):
            if w is not t:
                t.copy_(w)
