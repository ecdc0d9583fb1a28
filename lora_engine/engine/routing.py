"""Which tokens belong to which adapter, built once per batch and shared by every layer.

Each sequence carries one adapter id (-1 = base model only, e.g. the reference policy for the
KL term). A stable sort groups the flattened rows by adapter into one contiguous segment per
adapter present; the kernels address rows through the resulting index, so activations are
never permuted in memory.
"""
from __future__ import annotations

import torch

from lora_engine.kernels.lora import Routing


def build_routing(adapter_ids, seq_len: int, num_adapters: int, device=None) -> Routing:
    """Routing for a [B, L] batch flattened to B*L rows.

    Args:
        adapter_ids: [B] int (tensor or list), one id per sequence, in [-1, num_adapters).
        seq_len: L, the number of positions per sequence.
        num_adapters: A, adapters in the bank.
        device: where the kernels run (defaults to the ids' device).
    """
    ids = torch.as_tensor(adapter_ids)
    if device is None:
        device = ids.device
    ids = ids.detach().to("cpu", torch.int64).reshape(-1)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= num_adapters):
        raise ValueError(f"adapter ids must lie in [-1, {num_adapters - 1}] (-1 = base only); got "
                         f"min {int(ids.min())}, max {int(ids.max())}: add the adapter first or fix the ids")
    token_ids = ids.repeat_interleave(seq_len)
    return routing_from_token_ids(token_ids, num_adapters, device)


def routing_from_token_ids(token_ids, num_adapters: int, device=None) -> Routing:
    """Routing from one adapter id per row ([T] ints in [-1, A))."""
    ids = torch.as_tensor(token_ids)
    if device is None:
        device = ids.device
    ids = ids.detach().to("cpu", torch.int64).reshape(-1)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= num_adapters):
        raise ValueError(f"adapter ids must lie in [-1, {num_adapters - 1}]; got min {int(ids.min())}, "
                         f"max {int(ids.max())}")
    # Vectorised: a sort, a count and a cumulative sum, whatever the number of adapters. The base
    # rows (-1) sort first and are sliced off; no boolean-mask indexing (on 2 busy cores a masked
    # select of 4,096 rows took 21 ms, the slice 0.01 ms).
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids + 1, minlength=num_adapters + 1)
    order, counts = order[int(counts[0]):], counts[1:]
    seg_adapter = counts.nonzero().squeeze(1)
    seg_start = torch.cat([counts.new_zeros(1), counts[seg_adapter].cumsum(0)])
    return Routing(num_tokens=ids.numel(), token_idx=order.to(device), seg_start=tuple(seg_start.tolist()),
                   seg_adapter=tuple(seg_adapter.tolist()))
