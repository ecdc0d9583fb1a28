"""GRPO over many LoRA adapters at once on one frozen base model.

Objective. Each adapter a (parameters theta_a, its own prompts q ~ D drawn with its own seed,
G samples o_1..o_G per prompt from pi_old = pi_theta_a at rollout time) minimises

    L_a = AGG_{i in S_a, t} [ -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_it ]

    r_it = exp(logp_theta_a(o_it) - logp_old(o_it))        (token level; GSPO: per sequence)
    A_i  = (R_i - mean_group R) / (std_group R + 1e-4)      (scale_rewards="none": no division)
    k3_it = exp(ref_it - logp_it) - (ref_it - logp_it) - 1, ref = the same base, adapter off

where AGG is TRL's ``loss_type`` (grpo | bnpo | dr_grpo | dapo | luspo; cispo, sapo and vespo
replace the clipped term by their own surrogates, ``kernels.policy_loss.naive``) taken over
adapter a's own sequences and tokens only; ``kl_correction`` multiplies k3 by r_it (TRL's
``use_bias_correction_kl``). Groups dropped by ``drop_zero_variance`` leave every normaliser.
R_i = task correctness (+ format, + length); process / distillation rewards give A_it (rl.token_rewards).
sum_a L_a has a block-diagonal gradient: each adapter gets the update it gets alone, with its own
AdamW, clipping and NaN skip.
One step: rollout -> rewards -> advantages -> old/ref log-probs -> fused loss -> per-adapter step.
``algorithm = "ppo"`` replaces the advantages by a critic per adapter (``rl.ppo_step``).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from lora_engine import ops
from lora_engine.kernels.policy_loss import METRIC_NAMES, loss_normalisers
from lora_engine.engine.optimizer import AdapterOptimizer, BankAdamW
from lora_engine.rl.advantages import make_group_ids
from lora_engine.rl import checkpoints
from lora_engine.rl.config import TrainConfig, save_config, upgrade_saved_config
from lora_engine.rl.models import load_base
from lora_engine.engine.model import MultiLoRAModel
from lora_engine.engine.adalora import RankAllocator
from lora_engine.engine.peft_format import load_adapter_weights, save_adapter
from lora_engine.rl.metrics import print_summary
from lora_engine.rl.ppo_step import PPOStep
from lora_engine.rl.rollout import Rollouts, generate
from lora_engine.rl.metrics import RewardLog, format_ok
from lora_engine.rl.rewards import RewardStats, study_reward
from lora_engine.rl.runinfo import run_info
from lora_engine.rl.tasks import score_problems, stop_ids, task_from_config
from lora_engine.rl.token_rewards import TokenRewards, advantage_std


class GRPOTrainer:
    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None, task=None):
        self.cfg = cfg
        self.task = task if task is not None else task_from_config(cfg)  # a bad task errs before the model loads
        if model is None:
            model, tokenizer = load_base(cfg.model, cfg.dtype, cfg.device, progress=cfg.progress)
        self.tokenizer = tokenizer
        self.engine = MultiLoRAModel(model, list(cfg.adapters), target_modules=cfg.target_modules)
        self.ids = self.engine.adapter_ids
        self.token_rewards = TokenRewards(cfg, tokenizer, next(model.parameters()).device)
        self.optimizers = {a: self._make_optimizer(a) for a in self.ids}
        self.ranks = RankAllocator(self.engine.bank, cfg.steps)  # AdaLoRA's budget (a no-op without)
        # algorithm = "ppo": a critic per policy joins the bank after the policies (ids stay 0..n-1)
        self.ppo = PPOStep(self) if cfg.algorithm == "ppo" else None
        self.step_idx = 0
        self.tokens = {a: 0 for a in self.ids}
        self.out = Path(cfg.output_dir)

    def _make_optimizer(self, a: int) -> AdapterOptimizer:
        """Adapter a's share of the bank's one fused AdamW (``engine.optimizer``): its lr, B (and
        1-D vectors) at lr x LoRA+ ratio, its weight decay, its own state."""
        opt = BankAdamW.of(self.engine.bank)
        opt.configure_from_spec(a, self.engine.adapter_spec(a))
        return opt.adapter(a)

    # -- 1. rollout ---------------------------------------------------------------------
    def _seed(self, a: int, step: int, stream: int) -> int:
        # Every random draw of adapter a at a step comes from (its seed, step, stream): rollouts
        # never depend on other adapters, and a resumed run redraws exactly the same numbers.
        return (self.engine.adapter_spec(a).seed * 1_000_003 + step * 7_919 + stream) % (2**63)

    def rollout(self, step: int):
        cfg = self.cfg
        problems, adapter_of, prompt_of = [], [], []
        for a, n in zip(self.ids, cfg.prompts_per_adapter):
            g = torch.Generator().manual_seed(self._seed(a, step, 0))
            for j, p in enumerate(self.task.sample_train(n, g)):
                for _ in range(cfg.samples_per_prompt):
                    problems.append(p)
                    adapter_of.append(a)
                    prompt_of.append(j)
        prompt_ids = [self.task.encode_prompt(self.tokenizer, p) for p in problems]
        ro = generate(self.engine, prompt_ids, adapter_of, eos_id=stop_ids(self.task, self.tokenizer),
                      pad_id=self.tokenizer.pad_token_id, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, top_p=cfg.top_p,
                      seeds={a: self._seed(a, step, 1) for a in self.ids}, max_batch=cfg.rollout_batch_size)
        return problems, prompt_of, ro

    def decode(self, ro: Rollouts) -> list[str]:
        """Completion texts; positions after EOS become padding (id 0 is a real token, e.g. '!'
        in Qwen's vocabulary, so masking by multiplication would append garbage)."""
        ids = torch.where(ro.completion_mask.bool(), ro.completion_ids,
                          torch.full_like(ro.completion_ids, self.tokenizer.pad_token_id))
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    # -- 2. rewards and 3. advantages ---------------------------------------------------
    def rewards(self, problems, ro: Rollouts):
        """(total [B], correctness [B]): study A's reward (``rewards.study_reward``); its parts, the
        format rate and the verifier's counts per adapter go to the step's log (``metrics.RewardLog``)."""
        texts, owners = self.decode(ro), ro.adapter_ids.tolist()
        stats = {a: RewardStats() for a in set(owners)}
        correct = score_problems(self.task, problems, texts, [stats[a] for a in owners])
        parts = study_reward(problems, texts, correct, ro.completion_mask.sum(-1).tolist(), self.cfg)
        self.reward_log = RewardLog(parts, texts, stats)
        return self.reward_log.total, torch.tensor(correct, dtype=torch.float32)

    # -- 4. log-probs from hidden states (fused: no [T, V] logits on the GPU path) -------
    def token_logprobs(self, ro: Rollouts, adapter_ids, entropy=False):
        """[B, C] log-probs of the completions (and entropies) under ``adapter_ids`` (-1: the base)."""
        P = ro.prompt_len
        # Only generated tokens are scored; padding after EOS holds 0 (log-ratio 0, weight 0 in
        # the loss, masked in every metric).
        score = torch.nn.functional.pad(ro.completion_mask, (P, 0))
        res = self.engine.sequence_logprobs(ro.input_ids, ro.attention_mask, adapter_ids, score,
                                            temperature=self.cfg.temperature, return_entropy=entropy)
        return tuple(r[:, P:] for r in res) if entropy else res[:, P:]

    # -- 5. one training step -----------------------------------------------------------
    def step(self, step: int) -> dict[int, dict]:
        if self.ppo is not None:
            return self.ppo.step(step)
        cfg = self.cfg
        t0 = time.perf_counter()
        problems, prompt_of, ro = self.rollout(step)
        reward, correct = self.rewards(problems, ro)
        adapter_ids = ro.adapter_ids
        groups = make_group_ids(adapter_ids, torch.tensor(prompt_of))
        adv, keep = self.token_rewards.advantages(problems, ro, reward, groups)  # [B], or [B, C] (rl.token_rewards)
        mask = ro.completion_mask.float() * keep.float()[:, None].to(ro.completion_mask.device)
        device = ro.input_ids.device
        adv, ids_dev = adv.to(device), adapter_ids.to(device)
        # Dropped groups (drop_zero_variance) leave the batch: they are neither computed nor
        # counted in any adapter's normaliser (as sequences they would dilute grpo's mean).
        kept = keep.nonzero().squeeze(1).to(device)
        chunks = self._micro_batches(kept, device)
        with torch.no_grad():
            ref = self._stitch(ro, chunks, base=True) if cfg.beta > 0 else None
            old = self._stitch(ro, chunks, base=False) if cfg.inner_updates > 1 else None
        # Each micro-batch's per-adapter loss is rescaled from its own normaliser to the whole
        # batch's (kernels.policy_loss.loss_normalisers; metrics are token means), so the
        # accumulated gradient is the whole-batch gradient whatever the micro-batch size.
        A = self.engine.bank.num_slots
        full_loss_den, full_tok_den = self._normalisers(ids_dev[kept], mask[kept], A)
        skipped, grad_norms = set(), {}
        entropy = torch.zeros_like(mask)
        for _ in range(cfg.inner_updates):
            total = torch.zeros(A, device=device)
            metrics = None
            for idx in chunks:
                sub = ro.select(idx)
                logp, ent = self.token_logprobs(sub, sub.adapter_ids, entropy=True)
                entropy[idx] = ent.detach()
                # Only this micro-batch's adapters, by compact ids scattered back into [A]: the CPU
                # reference loops over the adapters it is given (1,024 per micro-batch otherwise).
                here, local = torch.unique(ids_dev[idx], return_inverse=True)
                part, m = ops.policy_loss(
                    logp, old[idx] if old is not None else logp.detach(), adv[idx], mask[idx], local,
                    ref_logp=ref[idx] if ref is not None else None, loss_type=cfg.loss_type,
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high, delta=cfg.delta, beta=cfg.beta,
                    num_adapters=here.numel(), max_completion_length=cfg.max_new_tokens, **cfg.loss_options)
                losses = part.new_zeros(A).index_add(0, here, part)
                m = {k: v.new_zeros(A).index_copy(0, here, v) for k, v in m.items()}
                loss_den, tok_den = self._normalisers(ids_dev[idx], mask[idx], A)
                w_loss, w_tok = loss_den / full_loss_den, tok_den / full_tok_den
                (losses * w_loss).sum().mul(cfg.loss_scale or 1.0).backward()
                total += losses.detach() * w_loss
                part = {k: v * w_tok for k, v in m.items()}
                metrics = part if metrics is None else {k: metrics[k] + part[k] for k in part}
            if cfg.loss_scale:
                self._unscale_grads(cfg.loss_scale)
            if metrics is None:  # every group dropped: nothing to learn from this batch
                metrics = {k: torch.zeros(A, device=device) for k in METRIC_NAMES}
            grad_norms = self._bank_step(total)
            skipped |= {a for a, n in grad_norms.items() if not math.isfinite(n)}
        wall = time.perf_counter() - t0
        return self._step_metrics(step, ro, reward, correct, adv, keep, mask, entropy, metrics,
                                  grad_norms, skipped, wall)

    def _micro_batches(self, rows, device) -> list[torch.Tensor]:
        """``rows`` (an index tensor, or B for every row) in pieces of ``micro_batch_size``."""
        rows = torch.arange(rows, device=device) if isinstance(rows, int) else rows.to(device)
        n = self.cfg.micro_batch_size or max(len(rows), 1)
        return [rows[i:i + n] for i in range(0, len(rows), n)]

    def _stitch(self, ro: Rollouts, chunks, base: bool) -> torch.Tensor:
        """[B, C] log-probs of the whole batch computed one micro-batch at a time (no grad):
        each row's own adapter, or with ``base`` the base model (the reference policy)."""
        out = torch.zeros(ro.completion_mask.shape, device=ro.input_ids.device)
        for idx in chunks:
            sub = ro.select(idx)
            ids = torch.full_like(sub.adapter_ids, -1) if base else sub.adapter_ids
            out[idx] = self.token_logprobs(sub, ids)
        return out

    def _unscale_grads(self, scale: float) -> None:
        """Undo the static loss scale before clipping (an overflow stays inf: that adapter skips)."""
        for p in self.engine.bank.parameters():
            if p.grad is not None:
                p.grad.div_(scale)

    def _normalisers(self, ids: torch.Tensor, mask: torch.Tensor, A: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per adapter: cfg.loss_type's loss normaliser and the metrics' token count over these rows."""
        return loss_normalisers(ids, mask, A, self.cfg.loss_type, self.cfg.max_new_tokens)

    def _bank_step(self, losses: torch.Tensor) -> dict[int, float]:
        """Clip and step every adapter at once, each on its own gradient norm (one fused AdamW
        over the bank); a non-finite loss or gradient skips that adapter alone, its weights and
        optimiser state untouched. Returns {adapter: gradient norm} (nan where skipped)."""
        opt = BankAdamW.of(self.engine.bank)
        bad = ~torch.isfinite(losses.detach()).cpu()
        self.ranks.backward_penalty()  # AdaLoRA's orthogonality term, each adapter's on its own tensors
        norms = opt.step(self.ids, self.cfg.max_grad_norm, skip=bad)
        self.ranks.update(self.step_idx)  # the step fit() is running (PEFT's global_step)
        opt.zero_grad()
        norms[bad] = float("nan")
        return dict(zip(self.ids, norms[self.ids].tolist()))

    def _step_metrics(self, step, ro, reward, correct, adv, keep, mask, entropy, metrics, grad_norms,
                      skipped, wall) -> dict[int, dict]:
        """One log row per adapter; every statistic is a segmented sum over the batch's rows by
        adapter id (index_add), not a pass over the batch per adapter."""
        A = self.engine.bank.num_slots
        ids = ro.adapter_ids.cpu().long()
        clen = ro.completion_mask.sum(-1).cpu().double()
        n = torch.bincount(ids, minlength=A).double()

        def total(x):
            return torch.zeros(A, dtype=torch.float64).index_add_(0, ids, x.detach().cpu().double())

        def std(x):  # unbiased, as torch.std: nan for a single row
            return (total((x.detach().cpu().double() - (total(x) / n).index_select(0, ids)) ** 2) / (n - 1)).sqrt()

        m = mask.detach().cpu().double()
        ent = total((entropy.detach().cpu().double() * m).sum(-1)) / total(m.sum(-1)).clamp_min(1)
        tok = (total(ro.prompt_tokens) + total(clen)).long().tolist()
        cols = {"reward_mean": total(reward) / n, "reward_std": std(reward), "accuracy": total(correct) / n,
                "adv_std": advantage_std(adv, ro.completion_mask, ids, A), "kl": metrics["kl_mean"].detach().cpu(),
                "clip_frac": metrics["clip_frac"].detach().cpu(), "entropy": ent, "response_len": total(clen) / n,
                "truncated_frac": total(ro.truncated.float()) / n, "kept_frac": total(keep.float()) / n}
        log = getattr(self, "reward_log", None)  # study A's parts, format rate, verifier counts
        cols.update(log.columns(ids, A) if log else {})
        cols, out = {k: v.tolist() for k, v in cols.items()}, {}
        for a in self.ids:
            self.tokens[a] += tok[a]
            out[a] = {"step": step, "adapter": a, "rank": self.engine.adapter_spec(a).rank,
                      **{k: float(v[a]) for k, v in cols.items()}, "grad_norm": grad_norms[a],
                      "skipped": a in skipped, "tokens_step": tok[a], "tokens_total": self.tokens[a], "wall_s": wall,
                      **(log.counts(a) if log else {})}
        return out

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, adapters=None, samples: int = 0) -> dict[int, dict]:
        """Held-out evaluation per adapter (-1 = the base), all adapters in one batch.

        Returns ``{adapter: {"pass@1": greedy accuracy, "entropy": mean token entropy of the
        policy on its greedy completions, and with samples=n > 0: "avg@n", "pass@n"}}``.
        """
        adapters = list(self.ids) if adapters is None else list(adapters)
        problems = self.task.eval_set(self.cfg.eval_problems)
        res = {a: {} for a in adapters}
        for mode in ["greedy"] + (["sampled"] if samples > 0 else []):
            n = 1 if mode == "greedy" else samples
            rows = [p for a in adapters for p in problems for _ in range(n)]
            owner = [a for a in adapters for _ in problems for _ in range(n)]
            prompt_ids = [self.task.encode_prompt(self.tokenizer, p) for p in rows]
            ro = generate(self.engine, prompt_ids, owner, eos_id=stop_ids(self.task, self.tokenizer),
                          pad_id=self.tokenizer.pad_token_id, max_new_tokens=self.cfg.max_new_tokens,
                          greedy=mode == "greedy", temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                          seeds={a: self._seed(a, 0, 3) if a >= 0 else 10**9 for a in adapters},
                          max_batch=self.cfg.rollout_batch_size)
            texts = self.decode(ro)
            scores = torch.tensor(self.task.score(rows, texts)).view(len(adapters), len(problems), n)
            if mode == "greedy":
                _, ent = self.token_logprobs(ro, ro.adapter_ids, entropy=True)
                m = ro.completion_mask.float()
                ent_row = ((ent * m).sum(-1) / m.sum(-1).clamp_min(1)).cpu().view(len(adapters), -1)
                boxed = format_ok(texts).view(len(adapters), -1)
                for i, a in enumerate(adapters):
                    res[a]["pass@1"] = float(scores[i].mean())
                    res[a]["entropy"] = float(ent_row[i].mean())
                    res[a]["format_rate"] = float(boxed[i].mean())
            else:
                from lora_engine.rl.metrics import pass_at_k
                for i, a in enumerate(adapters):
                    c = (scores[i] > 0.5).sum(-1).tolist()
                    res[a][f"avg@{n}"] = float(scores[i].mean())
                    res[a][f"pass@{n}"] = sum(pass_at_k(n, ci, n) for ci in c) / len(c)
        return res

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """adapters (PEFT format) + optimizer states + counters, written atomically (``checkpoints``)."""
        def fill(d: Path) -> None:
            for a in self.ids:
                save_adapter(self.engine, a, checkpoints.adapter_dir(d, a), base_model_name=self.cfg.model)
            torch.save({str(a): opt.state_dict() for a, opt in self.optimizers.items()}, d / checkpoints.OPTIMIZERS_FILE)
            if self.ppo is not None:
                self.ppo.save(d)
            (d / checkpoints.STATE_FILE).write_text(json.dumps({"step": self.step_idx, "tokens": self.tokens,
                                                                "config": self._resume_key()}, default=str))
        return checkpoints.write_checkpoint(self.out, self.step_idx, fill)

    # Fields a resumed run may change (extend steps, evaluate more often...); any other change
    # means the checkpoint belongs to a different experiment.
    RESUME_MAY_CHANGE = ("steps", "progress", "resume", "eval_every", "eval_problems", "eval_samples",
                         "checkpoint_every", "output_dir", "device", "micro_batch_size",
                         "rollout_batch_size")

    def _resume_key(self) -> dict:
        d = self.cfg.to_dict()
        return json.loads(json.dumps({k: v for k, v in d.items() if k not in self.RESUME_MAY_CHANGE}, default=str))

    def load_checkpoint(self) -> bool:
        ckpt = checkpoints.latest_checkpoint(self.out)
        if ckpt is None:
            return False
        state = json.loads((ckpt / checkpoints.STATE_FILE).read_text())
        saved = state.get("config")
        saved = upgrade_saved_config(saved) if saved is not None else None
        if saved is not None and saved != self._resume_key():
            changed = sorted(k for k in set(saved) | set(self._resume_key())
                             if saved.get(k) != self._resume_key().get(k))
            raise ValueError(f"{self.out} holds a checkpoint of a run with a different config (changed: "
                             f"{changed}): use another output_dir (--set output_dir=...) or start over "
                             "with --set resume=false")
        for a in self.ids:
            load_adapter_weights(self.engine, a, checkpoints.adapter_dir(ckpt, a))
        opt_states = torch.load(ckpt / checkpoints.OPTIMIZERS_FILE, weights_only=True)
        for a in self.ids:
            self.optimizers[a].load_state_dict(opt_states[str(a)])
        if self.ppo is not None:
            self.ppo.load(ckpt)
        self.tokens = {int(k): v for k, v in state["tokens"].items()}
        self.step_idx = state["step"]
        return True

    # -- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        t_start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / "config.json")
        (self.out / "run.json").write_text(json.dumps(run_info(), indent=2))
        resumed = cfg.resume and self.load_checkpoint()
        log_path, summary_path = checkpoints.start_log(self.out, resumed, self.step_idx)
        summary = json.loads(summary_path.read_text()) if resumed and summary_path.exists() else {}
        if "base" not in summary:
            ev = self.evaluate([-1] + list(self.ids), samples=cfg.eval_samples)
            summary = {"base": ev[-1]["pass@1"], "base_eval": ev[-1],
                       "initial": {str(a): ev[a] for a in self.ids}, "eval": []}
            summary_path.write_text(json.dumps(summary, indent=2))
        bar = tqdm(range(self.step_idx, cfg.steps), desc=cfg.algorithm.upper(), disable=not cfg.progress,
                   initial=self.step_idx, total=cfg.steps)
        with open(log_path, "a") as log:
            for step in bar:
                rows = self.step(step)
                for row in rows.values():
                    log.write(json.dumps(row) + "\n")
                log.flush()
                self.step_idx = step + 1
                bar.set_postfix({f"r{r['rank']}": f"{r['accuracy']:.2f}" for r in rows.values()})
                if cfg.eval_every and self.step_idx % cfg.eval_every == 0 and self.step_idx < cfg.steps:
                    ev = self.evaluate()
                    summary["eval"].append({"step": self.step_idx, **{str(a): v["pass@1"] for a, v in ev.items()}})
                if cfg.checkpoint_every and self.step_idx % cfg.checkpoint_every == 0:
                    summary_path.write_text(json.dumps(summary, indent=2))
                    self.save_checkpoint()
        final = self.evaluate(samples=cfg.eval_samples)
        summary["final"] = {str(a): v for a, v in final.items()}
        summary["tokens"] = {str(a): v for a, v in self.tokens.items()}
        summary["wall_s"] = summary.get("wall_s", 0.0) + time.perf_counter() - t_start
        summary_path.write_text(json.dumps(summary, indent=2))
        if self.step_idx % max(cfg.checkpoint_every, 1) != 0 or not cfg.checkpoint_every:
            self.save_checkpoint()
        print_summary(summary, [spec.rank for spec in cfg.adapters])
        return summary


def train(cfg: TrainConfig) -> dict:
    """Run a whole GRPO or PPO training from a config (the ``lora-engine train`` command)."""
    return GRPOTrainer(cfg).fit()
