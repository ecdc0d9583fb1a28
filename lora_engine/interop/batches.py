"""The client's data: a training ``Batch``, sampled ``Samples``, a forward_backward's output, and
the per-token losses ``Client`` computes (``token_loss``).

Every [B, L] tensor is aligned with ``input_ids``: entry ``[b, t]`` is about token t of row b,
predicted from tokens ``< t``; or, for a batch with ``target_ids`` (Tinker's alignment), about
``target_ids[b, t]`` predicted from tokens ``<= t``. ``LOSSES`` are the built-in losses.

Tinker's losses (``token_loss``), sums over tokens, never means. ``lp`` the learner's log-prob
of the target, ``q`` the sampler's (``sampling_logprobs``), ``r = exp(lp - q)``, ``A`` the
advantages (per token [B, L], or per sequence [B] broadcast), ``w`` the token weights (a 0/1
mask unless you scale it; Tinker's RL losses have no weights: pass 1 on every token):

    "cross_entropy":        -sum w * lp                        (any real w)
    "importance_sampling":  -sum w * r * A
    "ppo":                  -sum w * min(r * A, clip(r, lo, hi) * A)        lo, hi = 0.8, 1.2
    "cispo":                -sum w * stopgrad(clip(r, lo, hi)) * lp * A     lo, hi = 0.0, 4.0
    "dro":                  -sum w * (lp * A - beta / 2 * (lp - q)^2)       beta: no default
    "grpo" (the client's):  "ppo" with A_b = (R_b - mean_g R) / (std_g R + 1e-4) over b's group g
    "grpo", loss_type=T:    TRL 1.16's loss of type T (grpo bnpo dr_grpo dapo cispo sapo luspo vespo)
                            on the same A_b, normalised as TRL over the batch's rows (a mean, not
                            a sum: ``kernels.policy_loss.naive`` has every formula); eps_low/eps_high
                            as TRL's epsilon_low/epsilon_high (cispo: eps_high is its cap)

``lo``/``hi`` are ``loss_config``'s ``clip_low_threshold``/``clip_high_threshold`` (for "ppo"
defaulting to ``1 - eps_low``/``1 + eps_high``), ``beta`` its ``beta``. On tokens with w = 0 the
log-ratio is taken as 0, so garbage sampler log-probs at padding cannot make ``inf * 0``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lora_engine.kernels.policy_loss import LOSS_OPTION_DEFAULTS, LOSS_TYPES, check_loss_options

LOSSES = ("importance_sampling", "ppo", "grpo", "cross_entropy", "cispo", "dro")
# loss_config keys each loss reads, with their defaults (None: the caller must give it).
LOSS_CONFIG = {"cross_entropy": {}, "importance_sampling": {}, "grpo": {},
               "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
               "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
               "dro": {"beta": None}}


def trl_loss_config(loss, loss_type: str, loss_config: dict | None) -> dict:
    """The settings of TRL's ``loss_type`` through the client's "grpo": TRL's GRPOConfig names
    and defaults (``sapo_temperature_pos/neg``, ``vespo_k/lambda_pos/neg``) and
    ``max_completion_length`` (dr_grpo's length; None: the batch's width); unknown keys refused."""
    if loss != "grpo":
        raise ValueError(f"loss_type={loss_type!r} picks TRL's loss type of loss='grpo' (group-normalised "
                         f"rewards), got loss={loss!r}: pass loss='grpo' or drop loss_type")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: use one of {list(LOSS_TYPES)} (TRL 1.16's)")
    config = {k: v for k, v in LOSS_OPTION_DEFAULTS.items() if k != "kl_correction"}
    config["max_completion_length"] = None
    unknown = sorted(set(loss_config or {}) - set(config))
    if unknown:
        raise ValueError(f"loss_config keys {unknown} are not settings of TRL's {loss_type!r}; it takes {sorted(config)}")
    config.update(loss_config or {})
    mcl = config.pop("max_completion_length")
    return {**{k: v for k, v in check_loss_options(**config).items() if k != "kl_correction"},
            "max_completion_length": mcl}


@dataclass
class Batch:
    """Training data for one adapter: B sequences of prompt + completion tokens.

    Every [B, L] tensor is aligned with ``input_ids``: entry ``[b, t]`` is about token t of row
    b, predicted from tokens ``< t`` (so column 0 never carries a loss).

    Attributes:
        input_ids: [B, L] int64 token ids, prompt then completion, padded where
            ``attention_mask`` is 0 (right padding usually; left works too).
        weights: [B, L] float32 >= 0, the loss weight of token t: 1 on completion tokens, 0 on
            the prompt and padding; ``weights[:, 0]`` must be 0 (unless ``target_ids`` is set).
            "cross_entropy" takes any real weights (Tinker's custom losses send negative ones).
        attention_mask: [B, L] int64 0/1, or None for all ones.
        sampling_logprobs: [B, L] float32, log-prob of token t under the policy that sampled it
            (``client.sample`` returns them); required by the built-in losses, any value where
            the weight is 0.
        advantages: [B] float32, one per sequence, or [B, L] float32, one per token
            ("importance_sampling", "ppo", "cispo", "dro").
        rewards: [B] float32 and group_ids: [B] int64, for "grpo" (advantages normalised over
            the rows that share a group id, e.g. the samples of one prompt).
        target_ids: [B, L] int64 or None. Set: Tinker's alignment, entry ``[b, t]`` of every
            [B, L] tensor is about ``target_ids[b, t]`` predicted from ``input_ids[b, :t + 1]``,
            and log-probs are computed on every attended token (weights may be 0 there).
    """

    input_ids: torch.Tensor
    weights: torch.Tensor
    attention_mask: torch.Tensor | None = None
    sampling_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    target_ids: torch.Tensor | None = None

    @classmethod
    def from_sequences(cls, prompts: list[list[int]], completions: list[list[int]],
                       sampling_logprobs: list[list[float]] | None = None, advantages=None, rewards=None,
                       group_ids=None, pad_id: int = 0) -> "Batch":
        """Right-padded tensors from token lists; weight 1 on every completion token."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: give one each")
        B = len(prompts)
        L = max([len(p) + len(c) for p, c in zip(prompts, completions)] + [1])
        ids = torch.full((B, L), pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        w = torch.zeros((B, L), dtype=torch.float32)
        q = torch.zeros((B, L), dtype=torch.float32) if sampling_logprobs is not None else None
        for b, (p, c) in enumerate(zip(prompts, completions)):
            if not p:
                raise ValueError(f"row {b} has an empty prompt: the first completion token needs a prefix")
            n, m = len(p), len(c)
            ids[b, :n + m] = torch.tensor(list(p) + list(c), dtype=torch.long)
            attn[b, :n + m] = 1
            w[b, n:n + m] = 1.0
            if q is not None:
                if len(sampling_logprobs[b]) != m:
                    raise ValueError(f"row {b}: {len(sampling_logprobs[b])} sampling log-probs for {m} tokens")
                q[b, n:n + m] = torch.tensor(sampling_logprobs[b], dtype=torch.float32)
        as_t = lambda x, dt: None if x is None else torch.as_tensor(x, dtype=dt)  # noqa: E731
        return cls(ids, w, attn, q, as_t(advantages, torch.float32), as_t(rewards, torch.float32),
                   as_t(group_ids, torch.long))

    def check(self, loss, loss_config: dict | None = None) -> None:
        """Raise ``ValueError`` (naming the fix) if this batch cannot feed ``loss``."""
        ids, w = self.input_ids, self.weights
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError("input_ids must be an int64 tensor [B, L]; build it with Batch.from_sequences")
        B, L = ids.shape
        if not isinstance(w, torch.Tensor) or w.shape != (B, L) or not w.is_floating_point():
            raise ValueError(f"weights must be a float tensor [B, L]=[{B}, {L}] aligned with input_ids")
        shifted = self.target_ids is None
        if not shifted and (self.target_ids.shape != (B, L) or self.target_ids.is_floating_point()):
            raise ValueError(f"target_ids must be an int64 tensor [B, L]=[{B}, {L}] or None")
        if loss != "cross_entropy" and bool((w < 0).any()):
            raise ValueError(f"weights must be >= 0 for loss {loss!r} (only cross_entropy takes signed weights)")
        if shifted and bool((w[:, 0] != 0).any()):
            raise ValueError("weights[:, 0] must be 0: token 0 has no prefix to predict it from "
                             "(or give target_ids for next-token alignment)")
        if self.attention_mask is not None:
            if self.attention_mask.shape != (B, L):
                raise ValueError(f"attention_mask must be [B, L]=[{B}, {L}] or None")
            if bool(((w != 0) & (self.attention_mask == 0)).any()):
                raise ValueError("weights are nonzero on padding (attention_mask 0); zero them there")
        if callable(loss):
            return
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: use one of {LOSSES} or a callable(logprobs, batch)")
        missing = [k for k, v in LOSS_CONFIG[loss].items() if v is None and k not in (loss_config or {})]
        if missing:
            raise ValueError(f"loss {loss!r} needs loss_config {missing} (e.g. {{'beta': 0.05}})")
        if loss == "cross_entropy":
            return
        if self.sampling_logprobs is None or self.sampling_logprobs.shape != (B, L):
            raise ValueError(f"loss {loss!r} needs sampling_logprobs [B, L]=[{B}, {L}] (client.sample returns them)")
        if loss == "grpo":
            for name in ("rewards", "group_ids"):
                if getattr(self, name) is None or getattr(self, name).shape != (B,):
                    raise ValueError(f"loss 'grpo' needs {name} [B]=[{B}] (one per sequence)")
        elif self.advantages is None or self.advantages.shape not in ((B,), (B, L)):
            raise ValueError(f"loss {loss!r} needs advantages [B]=[{B}] (one per sequence) or [B, L]=[{B}, {L}]")


def token_loss(loss: str, logp: torch.Tensor, batch: Batch, weights: torch.Tensor,
               config: dict) -> tuple[torch.Tensor, dict]:
    """One item's Tinker loss (a sum over tokens; formulas in the module docstring) and metrics.

    ``logp`` [B, L] fp32 with grad; ``config`` the loss's settings with ``LOSS_CONFIG``'s
    defaults filled in. Plain PyTorch, not the fused policy-loss kernel: that one takes one
    advantage per sequence and symmetric clipping around 1, Tinker's losses per-token advantages
    and any thresholds; these few elementwise ops cost nothing next to the LM head.
    """
    if loss == "cross_entropy":
        return -(weights * logp).sum(), {}
    q = batch.sampling_logprobs.to(logp.device)
    adv = batch.advantages.to(logp.device, torch.float32)
    A = adv if adv.dim() == 2 else adv[:, None]
    on = weights != 0
    log_ratio = torch.where(on, logp - q, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    n = weights.abs().sum().clamp(min=1e-12)
    metrics = {"ratio_mean": float((ratio.detach() * weights).sum() / n)}
    if loss == "importance_sampling":
        per_token = ratio * A
    elif loss in ("ppo", "cispo"):
        lo, hi = float(config["clip_low_threshold"]), float(config["clip_high_threshold"])
        clipped = ratio.clamp(lo, hi)
        if loss == "cispo":
            per_token = clipped.detach() * logp * A
            hit = clipped != ratio
        else:
            per_token = torch.minimum(ratio * A, clipped * A)
            hit = (ratio * A) > (clipped * A)  # the clipped branch is the minimum: no gradient
        metrics["clip_frac"] = float((hit & on).sum() / on.sum().clamp(min=1))
    elif loss == "dro":
        per_token = logp * A - 0.5 * float(config["beta"]) * log_ratio ** 2
    else:
        raise ValueError(f"unknown loss {loss!r}: use one of {LOSSES}")
    return -(weights * per_token).sum(), metrics


@dataclass
class ForwardBackwardOutput:
    """What one forward_backward computed: ``loss`` (float), ``logprobs`` [B, L] fp32 (log-prob
    of token t where the weight is nonzero, or every real token for a callable loss; 0
    elsewhere), ``metrics`` (tokens, and ratio_mean / clip_frac for the built-in losses)."""

    loss: float
    logprobs: torch.Tensor
    metrics: dict = field(default_factory=dict)


@dataclass
class Samples:
    """Completions from ``Client.sample``, one row per (prompt, sample): prompt_index[k] is the
    prompt of row k, ``tokens[k]`` its completion (up to and including EOS), ``logprobs[k]`` their
    sampling log-probs (temperature-scaled distribution), ``text[k]`` (with a tokenizer)."""

    prompt_tokens: list[list[int]]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    prompt_index: list[int]
    adapters: list["object | None"]
    truncated: list[bool]
    text: list[str] | None
    pad_id: int

    def for_adapter(self, adapter: "object | None") -> "Samples":
        """The rows sampled with ``adapter`` (None: the base model)."""
        rows = [k for k, a in enumerate(self.adapters) if a is adapter]
        pick = lambda xs: None if xs is None else [xs[k] for k in rows]  # noqa: E731
        return Samples(pick(self.prompt_tokens), pick(self.tokens), pick(self.logprobs), pick(self.prompt_index),
                       pick(self.adapters), pick(self.truncated), pick(self.text), self.pad_id)

    def to_batch(self, advantages=None, rewards=None, group_ids=None) -> Batch:
        """A training ``Batch`` of these rows; ``group_ids`` defaults to ``prompt_index`` (for grpo)."""
        if rewards is not None and group_ids is None:
            group_ids = self.prompt_index
        return Batch.from_sequences(self.prompt_tokens, self.tokens, self.logprobs, advantages=advantages,
                                    rewards=rewards, group_ids=group_ids, pad_id=self.pad_id)
