"""Clipped-surrogate policy loss (GRPO/DAPO/Dr.GRPO/BNPO/GSPO) + k3 KL, aggregated per adapter."""
from .naive import IMPORTANCE_LEVELS, LOSS_TYPES, METRIC_NAMES, check_policy_loss_inputs, policy_loss_naive


def policy_loss_triton(*args, **kwargs):
    """Triton path (imported lazily so a machine without Triton can still use the reference)."""
    from .triton_policy_loss import policy_loss_triton as fn
    return fn(*args, **kwargs)


__all__ = ["IMPORTANCE_LEVELS", "LOSS_TYPES", "METRIC_NAMES", "check_policy_loss_inputs",
           "policy_loss_naive", "policy_loss_triton"]
