"""Per-token log-probs (+ entropy) from hidden states and the frozen LM head, no [T, V] logits."""
from .naive import check_logprobs_inputs, token_logprobs_naive


def token_logprobs_triton(*args, **kwargs):
    """Triton path (imported lazily so a machine without Triton can still use the reference)."""
    from .triton_logprobs import token_logprobs_triton as fn
    return fn(*args, **kwargs)


__all__ = ["check_logprobs_inputs", "token_logprobs_naive", "token_logprobs_triton"]
