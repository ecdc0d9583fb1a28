"""Fused AdamW over an adapter bank: per-adapter gradient norms by a segmented sum of squares,
then one AdamW step of every active adapter with its own coefficients (``segments.COEFS``)."""
from .naive import adamw_update_naive, segment_sumsq_naive
from .segments import COEFS, Segments, make_segments, split_dims
from .vectorised import adamw_update_torch, segment_sumsq_torch


def segment_sumsq_triton(*args, **kwargs):
    """Triton path (imported lazily so a machine without Triton can still use the others)."""
    from .triton_adamw import segment_sumsq_triton as fn
    return fn(*args, **kwargs)


def adamw_update_triton(*args, **kwargs):
    from .triton_adamw import adamw_update_triton as fn
    return fn(*args, **kwargs)


__all__ = ["COEFS", "Segments", "adamw_update_naive", "adamw_update_torch", "adamw_update_triton", "make_segments",
           "segment_sumsq_naive", "segment_sumsq_torch", "segment_sumsq_triton", "split_dims"]
