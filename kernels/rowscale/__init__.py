"""Routed row scale: ``out[t] = x[t] * scale[r] + shift[r]`` on the rows of every adapter whose
``slot_row`` entry r is >= 0, ``base[t]`` (or ``x[t]``) elsewhere: IA3 and LayerNorm tuning."""
from .layout import check_row_scale_inputs
from .naive import routed_scale_naive


def routed_scale_triton(*args, **kwargs):
    """Triton path (imported lazily so a machine without Triton can still use the reference)."""
    from .triton_rowscale import routed_scale_triton as fn
    return fn(*args, **kwargs)


__all__ = ["check_row_scale_inputs", "routed_scale_naive", "routed_scale_triton"]
