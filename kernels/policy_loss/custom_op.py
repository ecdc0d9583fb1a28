"""The fused policy loss as ``torch.library`` custom ops, so ``torch.compile`` traces through it
without a graph break and CUDA graphs can capture it.

``policy_loss_apply(logp, old, ref, mask, adv, ids, A, cfg)`` takes the arguments of
``triton_policy_loss._PolicyLoss.apply`` and returns the same ``(losses [A], metrics [M, A])``,
from the same launchers (``_policy_fwd``, ``_policy_bwd``). It lives in its own file so that the
kernel file stays free for new loss types; to route ``policy_loss_triton`` through it, replace
its ``_PolicyLoss.apply(`` call with ``policy_loss_apply(`` (then ``_PolicyLoss`` can go). The
launch config ``cfg`` travels as typed scalars (a custom op takes no dict): a new key in ``cfg``
must be added to ``CFG_KEYS`` and to the op's arguments, and ``policy_loss_apply`` refuses a
config it does not know rather than drop a key.
"""
from __future__ import annotations

from typing import Optional

import torch

from .naive import METRIC_NAMES
from .triton_policy_loss import _policy_bwd, _policy_fwd

CFG_KEYS = ("lo", "hi", "delta", "has_delta", "beta", "has_kl", "seq", "loss_type", "Lc")


@torch.library.custom_op("lora_engine::policy_loss", mutates_args=())
def _policy_loss_op(logp: torch.Tensor, old: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                    adv: torch.Tensor, ids: torch.Tensor, A: int, lo: float, hi: float, delta: float,
                    has_delta: bool, beta: float, has_kl: bool, seq: bool, loss_type: int,
                    Lc: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(losses [A], metrics [M, A], row statistics [B, 8], counts [2, A]), fp32; the last two
    are for the backward."""
    cfg = dict(zip(CFG_KEYS, (lo, hi, delta, has_delta, beta, has_kl, seq, loss_type, Lc)))
    return _policy_fwd(logp, old, ref, mask, adv, ids, A, cfg)


@_policy_loss_op.register_fake
def _(logp, old, ref, mask, adv, ids, A, lo, hi, delta, has_delta, beta, has_kl, seq, loss_type, Lc):
    f32 = lambda *shape: logp.new_empty(shape, dtype=torch.float32)
    return f32(A), f32(len(METRIC_NAMES), A), f32(logp.shape[0], 8), f32(2, A)


@torch.library.custom_op("lora_engine::policy_loss_backward", mutates_args=())
def _policy_loss_bwd_op(logp: torch.Tensor, old: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                        adv: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor,
                        g_losses: torch.Tensor, lo: float, hi: float, delta: float, has_delta: bool, beta: float,
                        has_kl: bool, seq: bool, loss_type: int, Lc: float) -> torch.Tensor:
    cfg = dict(zip(CFG_KEYS, (lo, hi, delta, has_delta, beta, has_kl, seq, loss_type, Lc)))
    return _policy_bwd(logp, old, ref, mask, adv, ids, rows, counts, g_losses, cfg)


@_policy_loss_bwd_op.register_fake
def _(logp, old, ref, mask, adv, ids, rows, counts, g_losses, *cfg):
    return torch.empty_like(logp)


def _setup(ctx, inputs, output):
    logp, old, ref, mask, adv, ids, A, *cfg = inputs
    _, _, rows, counts = output
    ctx.save_for_backward(logp, old, ref, mask, adv, ids, rows, counts)
    ctx.cfg = cfg


def _backward(ctx, g_losses, g_metrics, g_rows, g_counts):
    logp, old, ref, mask, adv, ids, rows, counts = ctx.saved_tensors
    dlogp = None
    if ctx.needs_input_grad[0]:
        # Upstream grads of losses.sum() arrive as a stride-0 expanded view; the kernel indexes them.
        dlogp = _policy_loss_bwd_op(logp, old, ref, mask, adv, ids, rows, counts, g_losses.float().contiguous(),
                                    *ctx.cfg)
    return (dlogp,) + (None,) * (6 + len(CFG_KEYS))


_policy_loss_op.register_autograd(_backward, setup_context=_setup)


def policy_loss_apply(logp, old, ref, mask, adv, ids, A, cfg):
    """``_PolicyLoss.apply`` as custom ops: contiguous [B, L] inputs (``mask`` fp32), [B] ``adv``
    and ``ids``, ``A`` adapters, the launch config ``cfg``. Returns (losses [A], metrics [M, A])."""
    if set(cfg) != set(CFG_KEYS):
        raise ValueError(f"policy loss cfg keys {sorted(cfg)} != {sorted(CFG_KEYS)}: add the new keys to "
                         "kernels/policy_loss/custom_op.py (CFG_KEYS and both ops' arguments)")
    losses, metrics, _, _ = _policy_loss_op(logp, old, ref, mask, adv, ids, int(A), float(cfg["lo"]),
                                            float(cfg["hi"]), float(cfg["delta"]), bool(cfg["has_delta"]),
                                            float(cfg["beta"]), bool(cfg["has_kl"]), bool(cfg["seq"]),
                                            int(cfg["loss_type"]), float(cfg["Lc"]))
    return losses, metrics
