"""PPO's critics: one per policy adapter, in the same bank, each with a scalar value head.

Critic c(a) of policy a is a LoRA adapter of its own rank and learning rate in the policies' bank
(so every critic rides the same frozen base forward as the policies) plus a value head

    V_a(h) = h . w_a + b_a,   h = the final hidden state (after the decoder's last norm)

where ``w [P, d]`` and ``b [P]`` hold one row per policy id. A batch's rows pick their head by a
gather (``index_select`` by the row's policy id), never a loop over critics. Like verl's critic
(``dp_critic._forward_micro_batch``), the value of completion token t is read from the hidden
state that predicts it (position P + t - 1), so V_t is the value of the state before o_t.

The heads' AdamW is torch's single-tensor AdamW (no weight decay) in one vectorised update
over every row, each row with its critic's lr and its own step count; a row is clipped by its
critic's whole gradient norm (the LoRA's gradients in the bank and the head's together, one
``clip_grad_norm_`` over both: ``BankAdamW.step(extra_sumsq=...)``) and skipped with it.
"""
from __future__ import annotations

import numpy as np
import torch

from lora_engine.engine.spec import AdapterSpec


def critic_spec(policy: AdapterSpec, rank: int = 0, lr: float = 0.0) -> AdapterSpec:
    """The critic of ``policy``: a plain LoRA with the policy's alpha, scaling, init, targets,
    layers, seed and weight decay, of ``rank`` (0: the policy's) at ``lr`` (0: the policy's)."""
    return AdapterSpec(rank=rank or policy.rank, alpha=policy.alpha, scaling=policy.scaling, seed=policy.seed,
                       init=policy.init, target_modules=policy.target_modules, lr=lr or policy.lr,
                       weight_decay=policy.weight_decay, layers=policy.layers,
                       name=f"critic_{policy.name}" if policy.name else None)


class ValueHeads:
    """The value heads of critics ``0..P-1`` (indexed by their policy's id), fp32 on ``device``.

    Row a starts at ``w_a ~ N(0, 1/(d+1)^2)`` from ``seeds[a]`` (OpenRLHF's value-head init) and
    ``b_a = 0``; ``lrs[a]`` is its AdamW learning rate.
    """

    def __init__(self, d: int, seeds: dict[int, int], lrs: dict[int, float], device,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        P = max(seeds) + 1 if seeds else 0
        w = torch.zeros(P, d)
        for a, s in seeds.items():  # once, at construction
            w[a] = torch.randn(d, generator=torch.Generator().manual_seed(int(s))) / (d + 1)
        self.weight = w.to(device).requires_grad_(True)
        self.bias = torch.zeros(P, device=device, requires_grad=True)
        self.lr = np.zeros(P)
        for a, v in lrs.items():
            self.lr[a] = float(v)
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        self.steps = np.zeros(P, dtype=np.int64)
        self.exp_avg = [torch.zeros_like(self.weight), torch.zeros_like(self.bias)]
        self.exp_avg_sq = [torch.zeros_like(self.weight), torch.zeros_like(self.bias)]

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.weight, self.bias]

    def values(self, hidden: torch.Tensor, policy_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] fp32 values of ``hidden`` [B, L, d] (any float dtype), row b by head ``policy_ids[b]``."""
        ids = policy_ids.to(self.weight.device, torch.long)
        w = self.weight.index_select(0, ids)
        return torch.einsum("bld,bd->bl", hidden.float(), w) + self.bias.index_select(0, ids)[:, None]

    def grad_sumsq(self) -> torch.Tensor:
        """[P] squared norm of each head's gradient (weight and bias rows)."""
        out = torch.zeros(self.weight.shape[0], device=self.weight.device)
        if self.weight.grad is not None:
            out = out + self.weight.grad.square().sum(1)
        if self.bias.grad is not None:
            out = out + self.bias.grad.square()
        return out

    def unscale_grads(self, scale: float) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(scale)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: np.ndarray, clip: np.ndarray) -> None:
        """One AdamW step of the rows ``active`` ([P] bool), gradients times ``clip`` ([P] fp32
        clip factors); the others keep weights, moments and step count."""
        if self.weight.grad is None and self.bias.grad is None:
            return
        active = np.asarray(active, dtype=bool)
        self.steps[active] += 1
        b1, b2 = self.betas
        step = np.where(active, self.steps, 1).astype(np.float64)
        # Torch's scalars: bias corrections in float64, lr / bc1 and sqrt(bc2) rounded to fp32.
        on = torch.from_numpy(active.astype(np.float32)).to(self.weight.device)
        neg_step = torch.from_numpy((-(self.lr / (1.0 - b1 ** step))).astype(np.float32)).to(on.device)
        bc2_sqrt = torch.from_numpy(((1.0 - b2 ** step) ** 0.5).astype(np.float32)).to(on.device)
        clip_t = torch.from_numpy(np.asarray(clip, dtype=np.float32)).to(on.device)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad * clip_t.view(shape)
            keep = on.view(shape)
            m.copy_(torch.where(keep > 0, torch.lerp(m, g, 1 - b1), m))
            v.copy_(torch.where(keep > 0, torch.addcmul(v * b2, g, g, value=1 - b2), v))
            upd = m / (v.sqrt() / bc2_sqrt.view(shape) + self.eps) * neg_step.view(shape)
            p.add_(torch.where(keep > 0, upd, torch.zeros_like(upd)))

    def state_dict(self) -> dict:
        return {"weight": self.weight.detach().clone(), "bias": self.bias.detach().clone(),
                "exp_avg": [t.clone() for t in self.exp_avg], "exp_avg_sq": [t.clone() for t in self.exp_avg_sq],
                "steps": torch.from_numpy(self.steps.copy()), "lr": torch.from_numpy(self.lr.copy())}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        if tuple(sd["weight"].shape) != tuple(self.weight.shape):
            raise ValueError(f"value heads in the checkpoint are {tuple(sd['weight'].shape)}, this run's "
                             f"{tuple(self.weight.shape)}: it was saved from another model or adapter list")
        self.weight.copy_(sd["weight"])
        self.bias.copy_(sd["bias"])
        for dst, src in zip(self.exp_avg + self.exp_avg_sq, list(sd["exp_avg"]) + list(sd["exp_avg_sq"])):
            dst.copy_(src)
        self.steps = sd["steps"].numpy().astype(np.int64).copy()
        self.lr = sd["lr"].numpy().astype(np.float64).copy()
