"""AdaLoRA (PEFT ``tuners/adalora``): the SVD-form update, its budget schedule and rank pruning,
and the orthogonality regulariser, for every AdaLoRA adapter of a bank at once.

Per module: P [r, K] (``adalora_A``), singular values E [r] (``adalora_E``), Q [N, r]
(``adalora_B``); y += s x (P * E)^T Q^T with s = alpha / (r + 1e-5) (PEFT's
``scaling / (ranknum + 1e-5)``; ranknum stays the initial rank r after pruning). Init as PEFT:
E = 0 (step 0 is exactly the base), P and Q ~ N(0, 0.02). In the kernel it is a LoRA pair
(A_eff = P * E, B_eff = Q), so it mixes with every other method in one batch.

Budget (PEFT's ``RankAllocator``), between optimiser steps, after the step and before the
gradients are cleared (``RankAllocator.update``): for each element of P, E, Q the sensitivity
I = |p * grad| is smoothed, I' <- beta1 I' + (1 - beta1) I, and its uncertainty
U <- beta2 U + (1 - beta2) |I - I'|; a triplet's score is s(E_i) + mean_k s(P_ik) + mean_n s(Q_ni)
with s = I' U. The budget follows PEFT's cubic schedule from init_bgt = sum of r over the
adapter's modules to target_bgt = target_r x modules: init_bgt for tinit steps, then
target + (init - target) (1 - (t - tinit) / (T - tfinal - tinit))^3, masking every deltaT steps;
at t = T - tfinal the mask is fixed and applied at every later step. Masking zeroes the pruned
singular values in place (the triplet's P row and Q column stay): nothing is repacked, and the
importance state lives beside the buffers (``AdapterBank.add_state``), so it moves with its
adapter when others come and go. All adapters at once: one sort of every triplet score by
(adapter, score) gives each adapter its own threshold, no loop over adapters.

Regulariser: R_a = mean over the adapter's matrices of ||P P^T - I||_F and ||Q^T Q - I||_F
(PEFT's), weighted by ``orth_reg_weight`` and added to the adapter's own loss
(``orth_penalty``): it touches that adapter's tensors only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_engine.checks import check_types

STATES = ("ada_ipt", "ada_unc", "ada_keep")  # beside adalora_A/E/B; ada_keep (E only): the fixed final mask
KINDS = ("adalora_A", "adalora_E", "adalora_B")


@dataclass(frozen=True)
class AdaLoraSchedule:
    """AdaLoRA's budget (PEFT's ``AdaLoraConfig`` fields; the initial rank is ``AdapterSpec.rank``).

    target_r: average rank per module at the end. tinit / tfinal: steps without pruning at the
    start / with the final mask at the end. delta_t: steps between two allocations (PEFT's
    deltaT). beta1 / beta2: EMA of sensitivity / uncertainty. orth_reg_weight: the orthogonality
    regulariser's weight. total_step: steps of the schedule (None: the trainer's ``steps``).
    """

    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def __post_init__(self):
        check_types(self)
        if self.target_r < 1 or self.tinit < 0 or self.tfinal < 0 or self.delta_t < 1:
            raise ValueError("AdaLoraSchedule: target_r and delta_t must be >= 1, tinit and tfinal >= 0")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1) or self.orth_reg_weight < 0:
            raise ValueError("AdaLoraSchedule: beta1 and beta2 must lie in (0, 1), orth_reg_weight >= 0")
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"AdaLoraSchedule: tinit={self.tinit} leaves no budgeting phase before "
                             f"total_step - tfinal = {self.total_step - self.tfinal}: lower tinit/tfinal")


# --- the methods-table record -----------------------------------------------------------------

def scale(rank: int, alpha: float) -> float:
    return alpha / (rank + 1e-5)


def init(spec, module, in_features, out_features, weight, generator):
    r = spec.rank_for(module)
    return {"adalora_A": torch.empty(r, in_features).normal_(0.0, 0.02, generator=generator),
            "adalora_E": torch.zeros(r),
            "adalora_B": torch.empty(out_features, r).normal_(0.0, 0.02, generator=generator)}


def pack(t, group):
    return [t["adalora_A"] * t["adalora_E"][:, None]], [t["adalora_B"]]


def delta(spec, module, t, weight, vera=None):
    a = t["adalora_A"].float() * t["adalora_E"].float()[:, None]
    return spec.scale_for(module) * (t["adalora_B"].float() @ a)


def peft_config(spec, targets=None):
    s = spec.adalora
    if s is None:  # asked of another method's spec (vLLM's servable check): the defaults
        s = AdaLoraSchedule()
    # Pruned triplets are exported as zero singular values at full rank (rank_pattern None): PEFT
    # loads them as they are and computes the same update. total_step must be > 0 for PEFT.
    return {"peft_type": "ADALORA", "init_r": spec.rank, "target_r": s.target_r, "lora_alpha": spec.alpha,
            "tinit": s.tinit, "tfinal": s.tfinal, "deltaT": s.delta_t, "beta1": s.beta1, "beta2": s.beta2,
            "orth_reg_weight": s.orth_reg_weight, "total_step": s.total_step or s.tinit + s.tfinal + 1,
            "rank_pattern": None, "lora_dropout": 0.0, "init_lora_weights": True, "use_rslora": False,
            "use_dora": False}


def to_peft(t):
    return {"lora_A": t["adalora_A"], "lora_E": t["adalora_E"][:, None], "lora_B": t["adalora_B"]}


def from_peft(found, module, r):
    """PEFT's lora_A / lora_E [r', 1] / lora_B; a pruned state dict (r' < r, saved with a
    rank_pattern) is padded with zero triplets: the same update, r rows as this spec has."""
    if f"{module}.lora_E" not in found:
        return
    (ka, a), (ke, e), (kb, b) = (found.pop(f"{module}.{k}") for k in ("lora_A", "lora_E", "lora_B"))
    e = e.reshape(-1)
    if e.numel() < r:
        pad = r - e.numel()
        a, e = torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([e, e.new_zeros(pad)])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1)
    found[f"{module}.adalora_A"], found[f"{module}.adalora_E"], found[f"{module}.adalora_B"] = (ka, a), (ke, e), (kb, b)
