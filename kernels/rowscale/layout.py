"""Input checks of the routed row scale (shared by the reference and the Triton path)."""
from __future__ import annotations

import torch


def check_row_scale_inputs(x, scale, slot_row, routing, shift=None, base=None):
    """Shape/dtype checks; raises ValueError with the fix."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T, N]; got shape {tuple(x.shape)}: flatten leading dims first")
    T, N = x.shape
    if scale.dim() != 2 or scale.shape[1] != N:
        raise ValueError(f"scale must be [n, N={N}] (one row per scaled adapter); got {tuple(scale.shape)}")
    if not scale.dtype.is_floating_point:
        raise ValueError(f"scale must be a float tensor, got {scale.dtype}")
    if shift is not None and shift.shape != scale.shape:
        raise ValueError(f"shift must be shaped like scale {tuple(scale.shape)}; got {tuple(shift.shape)}")
    if base is not None and base.shape != x.shape:
        raise ValueError(f"base must be shaped like x {tuple(x.shape)}; got {tuple(base.shape)}")
    if base is not None and base.dtype != x.dtype:
        raise ValueError(f"base dtype {base.dtype} != x dtype {x.dtype}: cast it with .to(x.dtype)")
    if slot_row.dim() != 1 or slot_row.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_row must be a 1-D int tensor [A] (row of scale per adapter slot, -1: none); "
                         f"got {slot_row.dtype} {tuple(slot_row.shape)}")
    for name, t in (("scale", scale), ("shift", shift), ("base", base), ("slot_row", slot_row)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: move it to x's device")
    if routing.num_tokens != T:
        raise ValueError(f"routing covers {routing.num_tokens} tokens but x has T={T}: rebuild the routing "
                         "for this batch")
    if routing.seg_adapter and max(routing.seg_adapter) >= slot_row.numel():
        raise ValueError(f"routing uses adapter {max(routing.seg_adapter)} but slot_row describes "
                         f"{slot_row.numel()} slots: give one entry per adapter slot")
