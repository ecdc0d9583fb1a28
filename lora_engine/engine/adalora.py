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

STATES = ("ada_ipt", "ada_unc", "ada_pruned")  # beside adalora_A/E/B; ada_pruned (E only): the final mask
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


# --- the budget, all AdaLoRA adapters of a bank at once ---------------------------------------

class RankAllocator:
    """AdaLoRA's rank budget over every AdaLoRA adapter of ``bank`` (PEFT's ``RankAllocator``, see
    the module docstring). ``total_steps``: the schedule's T where a spec leaves ``total_step`` None."""

    def __init__(self, bank, total_steps: int | None = None):
        self.bank, self.total_steps = bank, total_steps
        bank.add_state(STATES[:2], buffers=KINDS)
        bank.add_state(STATES[2:], buffers=("adalora_E",))
        self._cache: tuple = (None, None)
        self._buckets: dict = {}

    def _modules(self):
        """(module name, its buffers, the E slots) of every module holding AdaLoRA adapters."""
        for name in self.bank.modules_info:
            slots = self.bank.module_layout(name).slots.get("adalora_E")
            if slots is not None:
                yield name, self.bank.store[name.replace(".", "__")], slots

    def _schedule(self) -> dict[str, torch.Tensor]:
        """Per adapter slot: tinit, tfinal, T, deltaT, betas, weights, init/target budgets (fp64 [A]);
        built once per bank layout (its epoch), not per step."""
        if self._cache[0] == self.bank._epoch:
            return self._cache[1]
        A = self.bank.num_slots
        cols = {k: torch.zeros(A, dtype=torch.float64) for k in
                ("tinit", "tfinal", "total", "delta", "beta1", "beta2", "weight", "target", "init", "on")}
        for i, spec in self.bank.specs.items():
            if spec.method != "adalora":
                continue
            s, names = spec.adalora, self.bank.modules_of(i)
            total = s.total_step or self.total_steps
            if total is None or s.tinit >= total - s.tfinal:
                raise ValueError(f"AdaLoRA adapter {i}: schedule needs total_step > tinit + tfinal (got "
                                 f"{total}, {s.tinit}, {s.tfinal}): set adalora.total_step or the trainer's steps")
            vals = dict(tinit=s.tinit, tfinal=s.tfinal, total=total, delta=s.delta_t, beta1=s.beta1, beta2=s.beta2,
                        weight=s.orth_reg_weight, target=s.target_r * len(names),
                        init=sum(spec.rank_for(n) for n in names), on=1)
            for k, v in vals.items():
                cols[k][i] = v
        self._cache = (self.bank._epoch, cols)
        return cols

    @torch.no_grad()
    def update(self, step: int) -> torch.Tensor:
        """After an optimiser step, before the gradients are cleared: smooth the importance, then
        prune each adapter to its budget at ``step`` (PEFT's ``update_and_allocate(step)``).
        Returns the budget of every slot ([A] int64; 0 where not AdaLoRA)."""
        c = self._schedule()
        t, fix_at = float(step), c["total"] - c["tfinal"]
        learn = (c["on"] > 0) & (t < fix_at)
        mul = 1 - (t - c["tinit"]) / (fix_at - c["tinit"]).clamp_min(1)
        budget = torch.where(t <= c["tinit"], c["init"], ((c["init"] - c["target"]) * mul.clamp_min(0) ** 3
                                                          + c["target"]).floor())
        fix = (c["on"] > 0) & (t == fix_at)
        prune_now = ((c["on"] > 0) & (t > c["tinit"]) & (t < fix_at) & (torch.remainder(t, c["delta"]) == 0)) | fix
        mods = list(self._modules())
        scores, owners = [], []
        for name, store, slots in mods:
            owner = slots.owner.cpu()
            part = {}
            for kind, reduce in (("adalora_A", 1), ("adalora_E", None), ("adalora_B", 0)):
                p, ema, unc = store._parameters[kind], store._buffers[f"{kind}__ada_ipt"], store._buffers[f"{kind}__ada_unc"]
                shape = (-1, 1) if kind == "adalora_A" else ((1, -1) if kind == "adalora_B" else (-1,))
                on = lambda col: col.to(p.device, p.dtype).index_select(0, slots.owner).view(shape)  # noqa: E731
                if p.grad is not None:
                    ipt = (p * p.grad).abs().nan_to_num(0.0, 0.0, 0.0)
                    new = on(c["beta1"]) * ema + (1 - on(c["beta1"])) * ipt
                    ema.copy_(torch.where(on(learn.double()) > 0, new, ema))
                    new_u = on(c["beta2"]) * unc + (1 - on(c["beta2"])) * (ipt - ema).abs()
                    unc.copy_(torch.where(on(learn.double()) > 0, new_u, unc))
                s = ema * unc
                part[kind] = s if reduce is None else s.mean(reduce)
            # PEFT's order: s(E) + (mean s(P) + mean s(Q)), in the buffers' dtype.
            scores.append((part["adalora_E"] + (part["adalora_A"] + part["adalora_B"])).double().cpu())
            owners.append(owner)
        if not mods:
            return budget.long()
        score, owner = torch.cat(scores), torch.cat(owners)
        k = (c["init"] - budget).long()
        counts = torch.bincount(owner, minlength=k.numel())
        order = torch.argsort(score)
        order = order[torch.argsort(owner[order], stable=True)]  # by adapter, then by score
        idx = (counts.cumsum(0) - counts + k - 1).clamp(0, max(score.numel() - 1, 0))
        thr = score[order].index_select(0, idx)
        prune = (score <= thr[owner]) & prune_now[owner] & (k[owner] >= 1)
        final = t > fix_at
        start = 0
        for (name, store, slots), n in zip(mods, (s.numel() for s in scores)):
            e, pruned = store._parameters["adalora_E"], store._buffers["adalora_E__ada_pruned"]
            here, o = prune[start:start + n].to(e.device), owner[start:start + n]
            start += n
            fixed = fix[o].to(e.device)
            pruned.copy_(torch.where(fixed, here.to(pruned.dtype), pruned))
            here = torch.where(final[o].to(e.device), pruned > 0, here)
            e.masked_fill_(here, 0.0)
            for kind in KINDS:  # PEFT resets the importance once the final mask is fixed
                for st in STATES[:2]:
                    buf = store._buffers[f"{kind}__{st}"]
                    view = (-1, 1) if kind == "adalora_A" else ((1, -1) if kind == "adalora_B" else (-1,))
                    buf.mul_(1 - fixed.to(buf.dtype).view(view))
        return budget.long()

    def _rank_buckets(self, name, slots, device):
        """((r, which, rank rows, adapter ids) per distinct rank) of a module, once per bank layout."""
        key = (self.bank._epoch, name)
        if key not in self._buckets:
            out = []
            for r in sorted(set(slots.sizes)):
                which = [j for j, s in enumerate(slots.sizes) if s == r]
                out.append((r, which, torch.tensor([slots.offsets[j] + q for j in which for q in range(r)], device=device),
                            torch.tensor([slots.ids[j] for j in which], device=device)))
            self._buckets = {k: v for k, v in self._buckets.items() if k[0] == key[0]}
            self._buckets[key] = out
        return self._buckets[key]

    def backward_penalty(self) -> None:
        """Accumulate ``orth_penalty().sum()``'s gradient (nothing without AdaLoRA adapters)."""
        penalty = self.orth_penalty()
        if penalty is not None:
            penalty.sum().backward()

    def orth_penalty(self) -> torch.Tensor | None:
        """[A] fp32: orth_reg_weight_a x the mean of ||P P^T - I||_F, ||Q^T Q - I||_F over adapter a's
        modules (0 for other slots; differentiable), or None without AdaLoRA adapters. Batched per
        distinct rank on each module (a handful), never per adapter."""
        c = self._schedule()
        total = count = None
        for name, store, slots in self._modules():
            a, b = store._parameters["adalora_A"], store._parameters["adalora_B"]
            total = a.new_zeros(self.bank.num_slots) if total is None else total
            count = a.new_zeros(self.bank.num_slots) if count is None else count
            for r, which, idx, ids in self._rank_buckets(name, slots, a.device):
                eye = torch.eye(r, device=a.device, dtype=a.dtype)
                pa = a.index_select(0, idx).view(len(which), r, -1)
                qb = b.index_select(1, idx).view(b.shape[0], len(which), r).transpose(0, 1)
                fro = (torch.linalg.matrix_norm(pa @ pa.transpose(1, 2) - eye)
                       + torch.linalg.matrix_norm(qb.transpose(1, 2) @ qb - eye))
                total = total.index_add(0, ids, fro)
                count = count.index_add(0, ids, torch.full_like(fro, 2.0))
        if total is None:
            return None
        return c["weight"].to(total) * total / count.clamp_min(1)
