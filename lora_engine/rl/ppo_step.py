"""PPO over many adapters at once (``algorithm = "ppo"``): every policy adapter with its own critic.

Objective. Policy a (theta_a) and its critic c(a) (a LoRA in the same bank + value head a,
``rl.critic``), on a's own rollouts (sampled as GRPO's: ``GRPOTrainer.rollout``), minimise

    L_a = L_pi(a) + vf_coef * L_V(a)

    r_t     = R_i [t = last token] - beta * kl_t       kl_penalty = "reward": kl_t = kl_estimator(pi_old, ref)
    A, R    = GAE(gamma, lam) of r and V_old            (verl's compute_gae_advantage_return, ``rl.ppo.gae``)
    A_hat   = (A - mean_a A) / std_a A                  (whiten_advantages, over a's tokens)
    L_pi(a) = AGG_a -min(rho_t A_hat_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_hat_t)
              (+ beta * k3_t with kl_penalty = "loss"; cispo's or sapo's surrogate with those
              loss types; AGG is the loss type's normaliser over a's sequences: token-mean for
              dapo/bnpo/cispo, verl's seq-mean-token-mean for grpo/sapo, sum / (n_a *
              max_new_tokens) for dr_grpo, sum / n_a for luspo; vespo is refused, its phi is per sequence)
    L_V(a)  = 0.5 token-mean_a max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2)
              (verl's compute_value_loss, c = value_clip)

L_pi(a) reaches only theta_a and L_V(a) only critic c(a): the gradient is block-diagonal and
every policy and critic steps with its own AdamW (lr, clipping, NaN skip) in the bank's one
fused step, so a pair trained beside others gets the update it gets alone. The first
``critic_warmup_steps`` steps update only the critics (verl's ``critic_warmup = N + 1``: verl
counts steps from 1 and updates the actor once ``critic_warmup <= step``).

Rows. One decoder pass serves several roles of the same sequences: row b of adapter a is
repeated under a (log-probs), c(a) (values) and, without grad, -1 (the reference), in one
routed batch; ``micro_batch_size`` counts sequences, each forward holds 2-3 rows per sequence.
The fused policy-loss op takes the [B, C] per-token advantages on the real rows, so every loss
type's normaliser counts a's sequences and tokens as under GRPO.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from lora_engine import ops
from lora_engine.engine.optimizer import BankAdamW
from lora_engine.engine.peft_format import load_adapter_weights, save_adapter
from lora_engine.kernels.policy_loss import METRIC_NAMES
from lora_engine.rl import checkpoints, ppo
from lora_engine.rl.critic import ValueHeads, critic_spec


def policy_loss(logp, old, adv, mask, ids, ref, A: int, cfg):
    """Per-adapter [A] policy loss and metrics of these rows (ids [B]) with per-token advantages
    ``adv`` [B, L], each adapter normalised over its own rows here by ``cfg.loss_type`` (dr_grpo's
    length: ``cfg.max_new_tokens``). ``cfg``: the clip range, loss type and options; beta joins
    the loss with kl_penalty = "loss" (``ref`` otherwise only feeds the kl metric)."""
    here, local = torch.unique(ids, return_inverse=True)
    part, mt = ops.policy_loss(
        logp, old, adv, mask, local, ref_logp=ref, loss_type=cfg.loss_type, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, delta=cfg.delta, beta=cfg.beta if cfg.kl_penalty == "loss" else 0.0,
        num_adapters=here.numel(), max_completion_length=cfg.max_new_tokens, **cfg.loss_options)
    losses = part.new_zeros(A).index_add(0, here, part)
    return losses, {k: v.new_zeros(A).index_copy(0, here, v) for k, v in mt.items()}


class PPOStep:
    """The PPO side of a ``GRPOTrainer`` (``trainer.ppo``): critics, value heads, the step."""

    def __init__(self, trainer):
        self.tr, cfg, engine = trainer, trainer.cfg, trainer.engine
        self.policy_ids = list(trainer.ids)
        specs = [critic_spec(engine.adapter_spec(a), cfg.critic_rank, cfg.critic_lr) for a in self.policy_ids]
        self.critic_ids = engine.add_adapters(specs)
        opt = BankAdamW.of(engine.bank)
        for c, spec in zip(self.critic_ids, specs):
            opt.configure_from_spec(c, spec)
        head = engine.model.get_output_embeddings().weight
        self.device = head.device
        table = torch.full((max(self.policy_ids) + 1,), -1, dtype=torch.long)
        table[torch.tensor(self.policy_ids)] = torch.tensor(self.critic_ids)
        self.critic_of = table.to(self.device)
        self.heads = ValueHeads(head.shape[1], {a: engine.adapter_spec(a).seed for a in self.policy_ids},
                                {a: s.lr for a, s in zip(self.policy_ids, specs)}, self.device)

    # -- the routed forward ---------------------------------------------------------------
    def forward(self, sub, policy: bool, base: bool, entropy: bool = False) -> dict:
        """One decoder pass over ``sub``'s rows under their policies (``policy``), the base
        (``base``) and their critics: {"logp", "entropy", "ref", "values"}, each [b, C]."""
        eng, P = self.tr.engine, sub.prompt_len
        pid = sub.adapter_ids.to(self.device).long()
        roles = (["logp"] if policy else []) + (["ref"] if base else [])
        ids = {"logp": pid, "ref": torch.full_like(pid, -1), "values": self.critic_of[pid]}
        n, b = len(roles) + 1, pid.numel()
        x, am = sub.input_ids.repeat(n, 1), sub.attention_mask.repeat(n, 1)
        hidden = eng.hidden_states(x, am, torch.cat([ids[r] for r in roles + ["values"]]))
        # V_t from the state that predicts token t (position P + t - 1), as verl's critic.
        out = {"values": self.heads.values(hidden[-b:, P - 1:-1], pid) * sub.completion_mask}
        if roles:
            score = torch.nn.functional.pad(sub.completion_mask, (P, 0)).repeat(len(roles), 1)
            res = eng.logprobs_from_hidden(hidden[:-b], x[:-b], score, temperature=self.tr.cfg.temperature,
                                           return_entropy=entropy)
            logp, ent = res if entropy else (res, None)
            for k, r in enumerate(roles):
                out[r] = logp[k * b:(k + 1) * b, P:]
            if ent is not None and policy:
                out["entropy"] = ent[:b, P:]
        return out

    @torch.no_grad()
    def _estimates(self, ro, chunks):
        """pi_old's log-probs, the reference's (beta > 0) and V_old over the whole batch."""
        shape = ro.completion_mask.shape
        old, vals = torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device)
        ref = torch.zeros(shape, device=self.device) if self.tr.cfg.beta > 0 else None
        for idx in chunks:
            out = self.forward(ro.select(idx), policy=True, base=ref is not None)
            old[idx], vals[idx] = out["logp"], out["values"]
            if ref is not None:
                ref[idx] = out["ref"]
        return old, ref, vals

    # -- one step -----------------------------------------------------------------------------
    def step(self, step: int) -> dict[int, dict]:
        tr, cfg = self.tr, self.tr.cfg
        t0 = time.perf_counter()
        problems, _, ro = tr.rollout(step)
        reward, correct = tr.rewards(problems, ro)
        mask = ro.completion_mask.float()
        ids = ro.adapter_ids.to(self.device).long()
        A = tr.engine.bank.num_slots
        chunks = tr._micro_batches(ids.numel(), self.device)
        old, ref, old_v = self._estimates(ro, chunks)
        # outcome on the last token, or the regime's per-token deposits (process, distillation)
        rewards = tr.token_rewards.deposits(problems, ro, reward.to(self.device)).values.to(self.device)
        if ref is not None and cfg.kl_penalty == "reward":
            rewards = ppo.kl_in_reward(rewards, old, ref, mask, cfg.beta, cfg.kl_estimator)
        adv_raw, returns = ppo.gae(rewards, old_v, mask, cfg.gamma, cfg.lam)
        adv = ppo.whiten(adv_raw, mask, ids, A) if cfg.whiten_advantages else adv_raw
        warm = step < cfg.critic_warmup_steps
        # Each micro-batch's losses are rescaled from its own normalisers to the whole batch's
        # (the loss type's for the policy, tokens for the value loss and the metrics), so the
        # accumulated gradient is the whole batch's (as the GRPO step does).
        full_den, full_tok = tr._normalisers(ids, mask, A)
        entropy = torch.zeros_like(mask)
        for _ in range(cfg.inner_updates):
            pol, val, vclip = (torch.zeros(A, device=self.device) for _ in range(3))
            metrics = None
            for idx in chunks:
                sub, m, pid = ro.select(idx), mask[idx], ids[idx]
                out = self.forward(sub, policy=not warm, base=False, entropy=True)
                den, tok = tr._normalisers(pid, m, A)
                w, w_pol = tok / full_tok, den / full_den
                vl, vc = ppo.value_loss(out["values"], old_v[idx], returns[idx], m, pid, A,
                                        clip=cfg.value_clip or None)
                loss = cfg.vf_coef * (vl * w).sum()
                if not warm:
                    old_t = old[idx] if cfg.inner_updates > 1 else out["logp"].detach()
                    pl, mt = policy_loss(out["logp"], old_t, adv[idx], m, pid,
                                         ref[idx] if ref is not None else None, A, cfg)
                    loss = loss + (pl * w_pol).sum()
                    pol += pl.detach() * w_pol
                    part = {k: v * w for k, v in mt.items()}
                    metrics = part if metrics is None else {k: metrics[k] + part[k] for k in part}
                    entropy[idx] = out["entropy"].detach()
                if loss.requires_grad:
                    loss.mul(cfg.loss_scale or 1.0).backward()
                val += vl.detach() * w
                vclip += vc * w
            if cfg.loss_scale:
                tr._unscale_grads(cfg.loss_scale)
                self.heads.unscale_grads(cfg.loss_scale)
            norms, skip = self._bank_step(pol, val, warm)
        if metrics is None:
            metrics = {k: torch.zeros(A, device=self.device) for k in METRIC_NAMES}
        grad_norms = {a: float(norms[a]) for a in self.policy_ids}
        skipped = {a for a in self.policy_ids if not np.isfinite(norms[a])}
        adv_seq = (adv * mask).sum(1) / mask.sum(1).clamp(min=1)
        rows = tr._step_metrics(step, ro, reward, correct, adv_seq.cpu(), torch.ones_like(reward, dtype=torch.bool),
                                mask, entropy, metrics, grad_norms, skipped, time.perf_counter() - t0)
        return self._critic_metrics(rows, ids, mask, adv_raw, old_v, returns, val, vclip, norms, skip, warm)

    def _bank_step(self, pol: torch.Tensor, val: torch.Tensor, warm: bool):
        """Policies (unless ``warm``) and critics in one fused AdamW over the bank, each critic
        clipped on its LoRA's and head's gradients together; then the heads' step. Returns
        (norms [num_slots] with nan where a loss was not finite, skip [num_slots] bool)."""
        cfg, opt = self.tr.cfg, BankAdamW.of(self.tr.engine.bank)
        crit = torch.tensor(self.critic_ids, device=self.device)
        pols = torch.tensor(self.policy_ids, device=self.device)
        losses = pol.clone().index_copy(0, crit, val[pols])
        bad = ~torch.isfinite(losses).cpu()
        skip = bad.clone()
        if warm:
            skip[self.policy_ids] = True
        extra = torch.zeros_like(losses).index_copy(0, crit, self.heads.grad_sumsq()[pols])
        norms = opt.step(None, cfg.max_grad_norm, skip=skip, extra_sumsq=extra).numpy()
        cn = norms[self.critic_ids]
        active = np.zeros(self.heads.weight.shape[0], dtype=bool)
        clip = np.ones(self.heads.weight.shape[0], dtype=np.float32)
        active[self.policy_ids] = np.isfinite(cn) & ~skip.numpy()[self.critic_ids]
        clip[self.policy_ids] = BankAdamW.clip_factors(cn, cfg.max_grad_norm)
        self.heads.step(active, clip)
        opt.zero_grad()
        self.heads.zero_grad()
        norms[bad.numpy()] = np.nan
        return norms, skip.numpy()

    def _critic_metrics(self, rows, ids, mask, adv_raw, old_v, returns, val, vclip, norms, skip, warm):
        """Per adapter: value loss and clip fraction (last inner update), explained variance of
        V_old for the returns (verl's 1 - var(R - V) / (var(R) + 1e-5)), raw GAE advantage std."""
        A = self.tr.engine.bank.num_slots
        m = mask.double()
        n = torch.zeros(A, dtype=torch.float64, device=m.device).index_add(0, ids, m.sum(1))

        def mean_var(x):  # over each adapter's tokens; unbiased variance, as torch.var (nan for one token)
            x = x.double() * m
            mean = torch.zeros_like(n).index_add(0, ids, x.sum(1)) / n.clamp(min=1)
            sq = ((x - mean[ids][:, None]) * m).square().sum(1)
            return mean, torch.zeros_like(n).index_add(0, ids, sq) / (n - 1)

        ret_mean, ret_var = mean_var(returns)
        v_mean, _ = mean_var(old_v)
        _, diff_var = mean_var(returns.double() - old_v.double())
        _, adv_var = mean_var(adv_raw)
        cols = {"value_loss": val, "value_clip_frac": vclip, "explained_var": 1 - diff_var / (ret_var + 1e-5),
                "value_mean": v_mean, "return_mean": ret_mean, "adv_std": adv_var.clamp(min=0).sqrt()}
        cols = {k: v.detach().cpu().tolist() for k, v in cols.items()}
        for a, c in zip(self.policy_ids, self.critic_ids):
            rows[a].update({k: float(v[a]) for k, v in cols.items()})
            rows[a].update({"critic_grad_norm": float(norms[c]), "critic_skipped": bool(skip[c]),
                            "policy_updated": not warm and not rows[a]["skipped"]})
        return rows

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, d) -> None:
        """Critic c(a) as a PEFT adapter in ``critic_<a>/``; their optimizer states and the heads."""
        opt = BankAdamW.of(self.tr.engine.bank)
        for a, c in zip(self.policy_ids, self.critic_ids):
            save_adapter(self.tr.engine, c, checkpoints.critic_dir(d, a), base_model_name=self.tr.cfg.model)
        torch.save({"optimizers": {str(a): opt.state_dict_of(c) for a, c in zip(self.policy_ids, self.critic_ids)},
                    "heads": self.heads.state_dict()}, d / checkpoints.CRITICS_FILE)

    def load(self, ckpt) -> None:
        path = ckpt / checkpoints.CRITICS_FILE
        if not path.exists():
            raise ValueError(f"{ckpt} has no critics ({checkpoints.CRITICS_FILE}): it is not a PPO checkpoint; "
                             "use another output_dir or --set resume=false")
        state = torch.load(path, weights_only=True)
        opt = BankAdamW.of(self.tr.engine.bank)
        for a, c in zip(self.policy_ids, self.critic_ids):
            load_adapter_weights(self.tr.engine, c, checkpoints.critic_dir(ckpt, a))
            opt.load_state_dict_of(c, state["optimizers"][str(a)])
        self.heads.load_state_dict(state["heads"])
