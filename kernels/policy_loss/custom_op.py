"""The fused policy loss as ``torch.library`` custom ops, so ``torch.compile`` traces through it
without a graph break and CUDA graphs can capture it.

``policy_loss_apply(logp, old, ref, mask, adv, ids, A, cfg)`` is the autograd entry point of
``policy_loss_triton``: it returns ``(losses [A], metrics [M, A])`` from the launchers
``_policy_fwd`` / ``_policy_bwd``. A custom op takes no dict, so the launch config ``cfg``
travels as two lists, its float entries (``FLOAT_KEYS``) and its int/bool entries
(``INT_KEYS``); a new key of ``cfg`` goes into one of them, and ``policy_loss_apply`` refuses a
config with a key it does not know rather than drop it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .naive import METRIC_NAMES
from .triton_policy_kernels import NSTAT
from .triton_policy_loss import _policy_bwd, _policy_fwd

FLOAT_KEYS = ("lo", "hi", "cap", "delta", "beta", "t_pos", "t_neg", "k_pos", "lam_pos", "k_neg", "lam_neg", "Lc")
INT_KEYS = ("has_delta", "has_kl", "kl_corr", "seq", "surrogate", "norm")
CFG_KEYS = FLOAT_KEYS + INT_KEYS


def _cfg(floats, ints) -> dict:
    return {**dict(zip(FLOAT_KEYS, floats)), **{k: (bool(v) if k.startswith(("has_", "kl_", "seq")) else int(v))
                                                 for k, v in zip(INT_KEYS, ints)}}


@torch.library.custom_op("lora_engine::policy_loss", mutates_args=())
def _policy_loss_op(logp: torch.Tensor, old: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                    adv: torch.Tensor, ids: torch.Tensor, A: int, floats: list[float],
                    ints: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses [A], metrics [M, A], row statistics [B, NSTAT], counts [2, A]), fp32; the last two
    are for the backward."""
    return _policy_fwd(logp, old, ref, mask, adv, ids, A, _cfg(floats, ints))


@_policy_loss_op.register_fake
def _(logp, old, ref, mask, adv, ids, A, floats, ints):
    f32 = lambda *shape: logp.new_empty(shape, dtype=torch.float32)
    return f32(A), f32(len(METRIC_NAMES), A), f32(logp.shape[0], NSTAT), f32(2, A)


@torch.library.custom_op("lora_engine::policy_loss_backward", mutates_args=())
def _policy_loss_bwd_op(logp: torch.Tensor, old: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                        adv: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                        g_losses: torch.Tensor, floats: list[float], ints: list[int]) -> torch.Tensor:
    return _policy_bwd(logp, old, ref, mask, adv, ids, rows, counts, g_losses, _cfg(floats, ints))


@_policy_loss_bwd_op.register_fake
def _(logp, old, ref, mask, adv, ids, rows, counts, g_losses, floats, ints):
    return torch.empty_like(logp)


def _setup(ctx, inputs, output):
    logp, old, ref, mask, adv, ids, A, floats, ints = inputs
    _, _, rows, counts = output
    ctx.save_for_backward(logp, old, ref, mask, adv, ids, rows, counts)
    ctx.floats, ctx.ints = floats, ints


def _backward(ctx, g_losses, g_metrics, g_rows, g_counts):
    logp, old, ref, mask, adv, ids, rows, counts = ctx.saved_tensors
    dlogp = None
    if ctx.needs_input_grad[0]:
        # Upstream grads of losses.sum() arrive as a stride-0 expanded view; the kernel indexes them.
        dlogp = _policy_loss_bwd_op(logp, old, ref, mask, adv, ids, rows, counts, g_losses.float().contiguous(),
                                    ctx.floats, ctx.ints)
    return (dlogp,) + (None,) * 8


_policy_loss_op.register_autograd(_backward, setup_context=_setup)


def policy_loss_apply(logp, old, ref, mask, adv, ids, A, cfg):
    """The policy loss's autograd entry: contiguous [B, L] inputs (``mask`` fp32), [B] ``adv`` and
    ``ids``, ``A`` adapters, the launch config ``cfg``. Returns (losses [A], metrics [M, A])."""
    if set(cfg) != set(CFG_KEYS):
        raise ValueError(f"policy loss cfg keys {sorted(cfg)} != {sorted(CFG_KEYS)}: add the new keys to "
                         "kernels/policy_loss/custom_op.py (FLOAT_KEYS or INT_KEYS)")
    floats = [float(cfg[k]) for k in FLOAT_KEYS]
    ints = [int(cfg[k]) for k in INT_KEYS]
    losses, metrics, _, _ = _policy_loss_op(logp, old, ref, mask, adv, ids, int(A), floats, ints)
    return losses, metrics
