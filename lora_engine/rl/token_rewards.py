"""Token-level rewards for every loss type: (rollouts, their rewards, the reward regime) ->
per-token deposits -> per-token advantages, and the per-adapter statistics of those.

A reward may be one scalar per sequence or deposits per token, ``[N, T]`` over the response
tokens. :func:`as_deposits` takes either: a scalar goes on the sequence's last token (an
outcome), a ``[N, T]`` tensor deposits its non-zero entries, a :class:`Deposits` says where its
deposits are explicitly (an explicit 0 is a deposit: a wrong answer's outcome).

Each adapter has a *reward regime* (``TrainConfig.reward_regime``, one for all or one per
adapter), which only picks the reward function:

    outcome       the task's reward (+ format, + length terms), one deposit on the last token
    process       the PRM's score of every step, one deposit on each step's last token (``rl.prm``)
    distillation  r_t = log pi_T(o_t) - log pi(o_t) on every token (``rl.distill``)

The advantages then branch on each group's measured deposit density, never on the regime's
name (``advantages.deposit_advantages``: sparse -> DeepSeekMath's normalised return-to-go, dense
-> per-token group normalisation, threshold ``TrainConfig.dense_threshold``). An outcome-only
run keeps the sequence-level ``group_advantages`` (TRL's exact path); the two agree, since one
outcome deposit per row gives every token its sequence's group advantage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_engine.rl.advantages import deposit_advantages, group_advantages

REGIMES = ("outcome", "process", "distillation")


@dataclass
class Deposits:
    """Per-token rewards: ``values [N, T]`` float and ``placed [N, T]`` bool (where they were deposited)."""

    values: torch.Tensor
    placed: torch.Tensor


def last_token_deposits(scores, mask: torch.Tensor) -> Deposits:
    """Each sequence's scalar on its last valid token (a row without tokens gets none)."""
    m = mask.bool()
    s = torch.as_tensor(scores, dtype=torch.float32).to(m.device)
    if s.shape != (m.shape[0],):
        raise ValueError(f"sequence rewards must be [N]=[{m.shape[0]}], one per sequence, got {tuple(s.shape)}")
    last = m.shape[1] - 1 - m.flip(1).long().argmax(1)
    placed = torch.zeros_like(m)
    rows = m.any(1).nonzero().squeeze(1)
    placed[rows, last[rows]] = True
    return Deposits(torch.where(placed, s[:, None].expand_as(placed), torch.zeros((), device=m.device)), placed)


def as_deposits(reward, mask: torch.Tensor) -> Deposits:
    """A reward function's result as deposits over the completion ``mask [N, T]``: ``[N]`` scalars
    (list or tensor) -> :func:`last_token_deposits`; ``[N, T]`` -> its non-zero entries; a
    :class:`Deposits` as it is. Deposits under mask 0 are dropped; NaN/inf refused."""
    if isinstance(reward, Deposits):
        values, placed = reward.values, reward.placed.bool()
    else:
        t = torch.as_tensor(reward, dtype=torch.float32)
        if t.dim() == 1:
            return last_token_deposits(t, mask)
        values, placed = t, t != 0
    if values.shape != mask.shape or placed.shape != mask.shape:
        raise ValueError(f"token rewards must be [N, T]={tuple(mask.shape)} like the completion mask, got "
                         f"{tuple(values.shape)}; return one scalar per sequence or one value per response token")
    if not torch.isfinite(values).all():
        raise ValueError("token rewards contain nan/inf: return finite values (0 where nothing is deposited)")
    m = mask.bool().to(values.device)
    return Deposits(torch.where(m, values.float(), torch.zeros((), device=values.device)), placed.to(m.device) & m)


def per_adapter(x: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, A: int) -> dict[str, torch.Tensor]:
    """Per adapter over its valid tokens: ``mean`` and unbiased ``std`` of ``x [N, T]`` (nan below
    two tokens), and ``count`` of tokens; fp64 [A] on the CPU."""
    m = mask.detach().cpu().double()
    v = x.detach().cpu().double() * m
    ids = ids.cpu().long()
    cnt = torch.zeros(A, dtype=torch.float64).index_add_(0, ids, m.sum(1))
    mean = torch.zeros(A, dtype=torch.float64).index_add_(0, ids, v.sum(1)) / cnt
    dev = ((x.detach().cpu().double() - mean[ids][:, None]) ** 2) * m
    ss = torch.zeros(A, dtype=torch.float64).index_add_(0, ids, dev.sum(1))
    std = torch.where(cnt > 1, (ss / (cnt - 1).clamp_min(1)).sqrt(), torch.full_like(ss, float("nan")))
    return {"mean": mean, "std": std, "count": cnt}


def advantage_std(adv: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, A: int) -> torch.Tensor:
    """[A] fp64: each adapter's unbiased advantage std, over its sequences for ``[N]`` advantages,
    over its valid tokens for ``[N, T]`` ones (nan below two)."""
    if adv.dim() == 2:
        return per_adapter(adv, mask, ids, A)["std"]
    return per_adapter(adv[:, None], torch.ones(adv.shape[0], 1), ids, A)["std"]


class TokenRewards:
    """The trainer's token-level reward path: loads the PRM / teacher its adapters' regimes need."""

    def __init__(self, cfg, tokenizer, device):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.regimes = cfg.regime_per_adapter
        self.active = any(r != "outcome" for r in self.regimes)
        self.prm = self.teacher = None
        if "process" in self.regimes:
            from lora_engine.rl.prm import ProcessRewardModel
            from lora_engine.rl.tiny_judges import build_tiny_prm
            path = build_tiny_prm(progress=cfg.progress) if cfg.prm_model == "tiny" else cfg.prm_model
            self.prm = ProcessRewardModel.load(path, cfg.prm_kind, cfg.prm_step_tag, cfg.step_separator,
                                               dtype=cfg.dtype, device=device)
        if "distillation" in self.regimes:
            from lora_engine.rl.distill import Teacher
            from lora_engine.rl.tiny_judges import build_tiny_teacher
            path = build_tiny_teacher(progress=cfg.progress) if cfg.teacher_model == "tiny" else cfg.teacher_model
            self.teacher = Teacher.load(path, tokenizer, dtype=cfg.dtype, device=device, progress=cfg.progress)

    def deposits(self, problems, ro, reward: torch.Tensor) -> Deposits:
        """Every row's deposits by its adapter's regime. Distillation's student log-probs are the
        rollout's own (``ro.sampling_logp``: the policy that sampled, at the sampling temperature)."""
        mask = ro.completion_mask.bool()
        regime = [self.regimes[a] for a in ro.adapter_ids.tolist()]
        out = last_token_deposits(reward, mask)
        for name in ("process", "distillation"):
            rows = torch.tensor([r == name for r in regime], device=mask.device)
            if not rows.any():
                continue
            if name == "process":
                from lora_engine.rl import prm
                values, placed = prm.deposits(self.prm, self.tokenizer, [p["prompt"] for p in problems],
                                              ro.completion_ids, mask)
            else:
                from lora_engine.rl.distill import distillation_rewards
                values = distillation_rewards(self.teacher, ro, ro.sampling_logp, self.cfg.temperature)
                placed = mask
            sel = rows[:, None]
            out = Deposits(torch.where(sel, values.to(out.values.device), out.values),
                           torch.where(sel, placed.to(mask.device), out.placed))
        return out

    def advantages(self, problems, ro, reward, groups) -> tuple[torch.Tensor, torch.Tensor]:
        """``(advantages, keep [N] bool)``: ``[N]`` from ``group_advantages`` when every adapter's
        regime is outcome (TRL's path), else ``[N, C]`` from the deposits; with
        ``drop_zero_variance`` a group whose advantages are all 0 is not kept."""
        if not self.active:
            adv, keep, _ = group_advantages(reward, groups, scale=self.cfg.scale_rewards,
                                            drop_zero_variance=self.cfg.drop_zero_variance)
            return adv, keep
        dep = self.deposits(problems, ro, reward)
        adv, _ = deposit_advantages(dep.values, ro.completion_mask.bool(), groups, placed=dep.placed,
                                    dense_threshold=self.cfg.dense_threshold, scale=self.cfg.scale_rewards)
        keep = torch.ones(adv.shape[0], dtype=torch.bool)
        if self.cfg.drop_zero_variance:
            g = groups.cpu()
            live = torch.zeros(int(g.max()) + 1 if g.numel() else 0).index_add_(0, g, adv.abs().sum(1).cpu().float())
            keep = (live > 0)[g]
        return adv, keep
