"""Per-adapter policy loss (TRL 1.16's GRPO loss types: grpo, bnpo, dr_grpo, dapo, cispo, sapo,
luspo, vespo; token or sequence (GSPO) ratios) + k3 KL, plain or bias-corrected.

``LOSS_TYPES`` and ``loss_normalisers`` are the one home of the loss-type list and of each
type's per-adapter normaliser (the trainer rescales micro-batches with it)."""
from .loss_types import (LOSS_TYPES, NORMALISER, NORMALISERS, SEQUENCE_ADVANTAGE_ONLY, SURROGATE, SURROGATES,
                         loss_normalisers)
from .naive import (IMPORTANCE_LEVELS, LOSS_OPTION_DEFAULTS, METRIC_NAMES, check_loss_options,
                    check_policy_loss_inputs, policy_loss_naive)


def policy_loss_triton(*args, **kwargs):
    """Triton path (imported lazily so a machine without Triton can still use the reference)."""
    from .triton_policy_loss import policy_loss_triton as fn
    return fn(*args, **kwargs)


__all__ = ["IMPORTANCE_LEVELS", "LOSS_OPTION_DEFAULTS", "LOSS_TYPES", "METRIC_NAMES", "NORMALISER",
           "NORMALISERS", "SEQUENCE_ADVANTAGE_ONLY", "SURROGATE", "SURROGATES", "check_loss_options", "check_policy_loss_inputs",
           "loss_normalisers", "policy_loss_naive", "policy_loss_triton"]
