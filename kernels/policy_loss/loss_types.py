"""The policy loss's loss types and their per-adapter normalisers: the one home of both.

Every loss type is a per-token surrogate (how ``loss_tok`` is formed from the importance
ratio, the advantage and the log-prob) and a normaliser (what an adapter's masked sum of
``loss_tok`` is divided by). TRL 1.16's ``GRPOTrainer._compute_loss`` definitions:

    name     surrogate  normaliser (per adapter a: n_a sequences, tok_a masked tokens)
    grpo     clip       sequence_mean       sum_b (row_b / max(m_b, 1)) / max(n_a, 1)
    bnpo     clip       tokens              sum_b row_b / max(tok_a, 1)
    dr_grpo  clip       sequences_x_length  sum_b row_b / max(n_a * max_completion_length, 1)
    dapo     clip       tokens
    cispo    cispo      tokens
    sapo     sapo       sequence_mean
    luspo    clip       sequences           sum_b row_b / max(n_a, 1)  (length-unbiased: no / m_b)
    vespo    vespo      tokens

with ``row_b = sum_l mask * loss_tok`` and ``m_b = sum_l mask`` of sequence b. TRL divides
dapo, cispo and vespo by the token count of the whole generation batch (``num_items_in_batch``)
and bnpo by the micro-batch's; per adapter and per call here both are "the tokens given".

``loss_normalisers`` returns, per adapter, the denominator above (``max(n_a, 1)`` for the two
sequence kinds) and the token count the metrics divide by. The loss of a subset S of an
adapter's sequences times ``den_S / den_all`` is that subset's share of the whole-batch loss
(numerators add over sequences, every clamp is applied identically on both sides), so summing
rescaled micro-batch losses gives exactly the whole-batch loss and gradient, for every type.
"""
from __future__ import annotations

import numbers

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
SURROGATES = ("clip", "cispo", "sapo", "vespo")
NORMALISERS = ("sequence_mean", "sequences", "sequences_x_length", "tokens")

SURROGATE = {"grpo": "clip", "bnpo": "clip", "dr_grpo": "clip", "dapo": "clip", "luspo": "clip",
             "cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}
NORMALISER = {"grpo": "sequence_mean", "sapo": "sequence_mean", "luspo": "sequences",
              "dr_grpo": "sequences_x_length",
              "bnpo": "tokens", "dapo": "tokens", "cispo": "tokens", "vespo": "tokens"}

# Loss types whose surrogate weighs a whole sequence by one factor (vespo's phi_b) paired with
# one advantage: they take [B] advantages only, never per-token ones (nor does GSPO's ratio).
SEQUENCE_ADVANTAGE_ONLY = ("vespo",)


def check_loss_type(loss_type) -> str:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {list(LOSS_TYPES)}")
    return loss_type


def loss_normalisers(adapter_ids: torch.Tensor, mask: torch.Tensor, num_adapters: int, loss_type: str,
                     max_completion_length: int | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-adapter denominators of ``loss_type`` for the sequences given.

    Args:
        adapter_ids: [B] int in [0, num_adapters), on the device of ``mask``.
        mask: [B, L] bool/int/float completion mask (float values are token weights).
        num_adapters: A.
        loss_type: one of ``LOSS_TYPES``.
        max_completion_length: dr_grpo's length constant (the generation cap); None means L.
        dtype: of the results (the loss's compute dtype).

    Returns:
        ``(loss_den [A], tok_den [A])``: ``loss_den`` what adapter a's loss divides its summed
        (grpo, sapo: summed per-sequence means of) masked per-token loss by, ``max(n_a, 1)``,
        ``max(n_a * max_completion_length, 1)`` or ``max(tok_a, 1)``; ``tok_den = max(tok_a, 1)``,
        the metrics' denominator. No host sync.
    """
    check_loss_type(loss_type)
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, numbers.Integral) or num_adapters < 0:
        raise ValueError(f"num_adapters must be an int >= 0, got {num_adapters!r}")
    if mask.dim() != 2 or adapter_ids.shape != mask.shape[:1]:
        raise ValueError(f"mask must be [B, L] and adapter_ids [B], got {tuple(mask.shape)} and "
                         f"{tuple(adapter_ids.shape)}; pass one adapter id per row of the mask")
    Lc = mask.shape[1] if max_completion_length is None else max_completion_length
    if isinstance(Lc, bool) or not isinstance(Lc, numbers.Integral) or Lc < 1:
        raise ValueError(f"max_completion_length must be an int >= 1 (the generation cap) or None, "
                         f"got {max_completion_length!r}")
    A = int(num_adapters)
    ids = adapter_ids.to(device=mask.device, dtype=torch.long)
    tok = torch.zeros(A, device=mask.device, dtype=dtype).index_add(0, ids, mask.to(dtype).sum(-1))
    tok_den = tok.clamp(min=1.0)
    kind = NORMALISER[loss_type]
    if kind == "tokens":
        return tok_den, tok_den
    # index_add, not bincount: bincount sizes its output from ids.max(), a host sync on a GPU
    n = torch.zeros(A, device=mask.device, dtype=dtype).index_add(0, ids, torch.ones_like(ids, dtype=dtype))
    if kind == "sequences_x_length":
        return (n * int(Lc)).clamp(min=1.0), tok_den
    return n.clamp(min=1.0), tok_den
