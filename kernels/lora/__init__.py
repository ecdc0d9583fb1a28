"""Multi-adapter LoRA linear: ``y = x W^T + b + s_a (x A_a^T) B_a^T`` per adapter segment."""
from .layout import LoRALayout, Routing, check_lora_inputs
from .naive import lora_linear_naive


def lora_linear_triton(*args, **kwargs):
    """Triton path (imported lazily so a machine without Triton can still use the reference)."""
    from .triton_lora import lora_linear_triton as fn
    return fn(*args, **kwargs)


__all__ = ["LoRALayout", "Routing", "check_lora_inputs", "lora_linear_naive", "lora_linear_triton"]
