"""Multi-adapter LoRA linear: ``y = x W^T + b + s_a (x A_a^T) B_a^T`` per adapter segment, and
DoRA's per-column scale epilogue over its output."""
from .layout import LoRALayout, Routing, TokenChunks, check_column_scale_inputs, check_lora_inputs, token_chunk_rows
from .naive import lora_column_scale_naive, lora_linear_naive


def lora_linear_triton(*args, **kwargs):
    """Triton path (imported lazily so a machine without Triton can still use the reference)."""
    from .triton_lora import lora_linear_triton as fn
    return fn(*args, **kwargs)


def lora_column_scale_triton(*args, **kwargs):
    """Triton path of the DoRA epilogue (imported lazily, as ``lora_linear_triton``)."""
    from .triton_dora import lora_column_scale_triton as fn
    return fn(*args, **kwargs)


__all__ = ["LoRALayout", "Routing", "TokenChunks", "check_column_scale_inputs", "check_lora_inputs",
           "lora_column_scale_naive", "lora_column_scale_triton", "lora_linear_naive", "lora_linear_triton",
           "token_chunk_rows"]
