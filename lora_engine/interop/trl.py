"""TRL's ``GRPOTrainer`` on lora-engine's LoRA layer and fused log-prob + policy-loss path.

    from trl import GRPOConfig
    from lora_engine.interop.trl import LoraEngineGRPOTrainer, wrap_for_trl

    model = wrap_for_trl(AutoModelForCausalLM.from_pretrained(path), le.AdapterSpec(rank=16, alpha=32))
    trainer = LoraEngineGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
                                    train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_adapter("out/adapter")          # PEFT format: PeftModel / vLLM load it

``wrap_for_trl`` replaces the model's linear layers (in place, on this instance) by
``MultiLoRALinear`` with one adapter, id 0, active for every sequence (any ``AdapterSpec``
method: LoRA, DoRA, PiSSA, VeRA...); only that adapter's trainable tensors require grad, so
TRL's optimiser trains exactly them. The reference policy for the KL
term (``beta > 0``) is the same model with the adapter switched off: no second copy.

``LoraEngineGRPOTrainer`` is a subclass of ``trl.GRPOTrainer`` (trl 1.16) that overrides only
``_compute_loss``: the final hidden states of the completion tokens go through
``le.ops.masked_token_logprobs`` (no [B, C, V] logits on a GPU) and ``le.ops.policy_loss``,
scaled to TRL's normalisation of each ``loss_type`` exactly (all eight of TRL 1.16: grpo, bnpo,
dr_grpo, dapo, cispo, sapo, luspo, vespo; token or sequence importance sampling, two-sided
``delta``, k3 KL with or without TRL's ``use_bias_correction_kl``, its default). Features of
TRL's loss that the fused path does not implement raise ``ValueError`` at construction (the
entropy mask or bonus, the off-policy mask, vLLM, MoE aux loss). Logged metrics: ``kl``,
``entropy``, ``clip_ratio/{low,high,region}_mean`` for the clipped types and
``cispo_clip_ratio`` as TRL logs them (``clip_ratio/low_min``/``high_max`` and
``vespo/phi_seq_mean`` are not logged; at sequence level the clip ratios weigh sequences by
their token counts).
"""
from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn

from lora_engine import ops
from lora_engine.engine import peft_format
from lora_engine.engine.spec import AdapterSpec
from lora_engine.engine.layers import MultiLoRALinear, RoutingState
from lora_engine.engine.model import MultiLoRAModel
from lora_engine.engine.routing import build_routing
from lora_engine.kernels.policy_loss import LOSS_TYPES, SURROGATE, loss_normalisers

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - trl is an optional extra
    raise ImportError("lora_engine.interop.trl needs trl: pip install 'lora-engine[trl]'") from e

# Config fields that rescale or cap the logits inside the model's own head; the fused path
# computes plain ``h @ W^T / temperature``, so models that set them are refused.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
# Routings kept per shape: generation asks for a new (B, L) at every prompt length, and each
# routing holds B * L indices, so an unbounded cache would grow with the run.
_ROUTING_CACHE = 8


_VERSIONED = ("dora", "pair")  # bank memo kinds whose last key element is the version counters


class _LatestMemo(dict):
    """The bank's no-grad memo, keeping only the newest entry per slot.

    The bank's memo keys end in the weights' version counters (``("dora", module, versions)``,
    ``("pair", module, dtype, versions)``). Keeping one entry per key less its versions bounds
    the memo by the number of modules while generation still reuses each entry for every
    decoded token. Version counters are not enough on their own: torch's fused AdamW
    (transformers 5's default optimiser) updates parameters without bumping them. So every
    forward with grad enabled clears the memo (``_SingleAdapterRouting.routing_for``): an
    optimiser step always follows one, and no-grad forwards between two of them (one
    generation) share the cache.
    """

    def __setitem__(self, key, value):
        slot = key[:-1] if key[0] in _VERSIONED else key
        stale = [k for k in self if k[0] in _VERSIONED and k[:-1] == slot and k != key]
        for k in stale:
            del self[k]
        super().__setitem__(key, value)


class _SingleAdapterRouting(RoutingState):
    """Routes every sequence of every batch to adapter 0 (``adapter_ids=None`` turns it off).

    The routing context never ends (no ``use_adapters`` block), so its memo is never cleared by
    a context exit: it is a ``_LatestMemo`` instead, bounded by the number of modules.
    """

    def __init__(self):
        super().__init__()
        self.set(torch.zeros(1, dtype=torch.long), 1)

    def set(self, adapter_ids, num_slots: int) -> None:
        super().set(adapter_ids, num_slots)
        self.memo = _LatestMemo()

    def routing_for(self, batch: int, seq_len: int, device):
        if torch.is_grad_enabled() and self.memo:
            self.memo.clear()  # weights may change after this pass (see _LatestMemo)
        key = (batch, seq_len, str(device))
        if key not in self._cache:
            if len(self._cache) >= _ROUTING_CACHE:
                self._cache.clear()
            self._cache[key] = build_routing(torch.zeros(batch, dtype=torch.long), seq_len, 1, device)
        return self._cache[key]


def wrap_for_trl(model: nn.Module, spec: AdapterSpec | None = None, target_modules="all-linear") -> nn.Module:
    """Put one trainable lora-engine adapter on ``model``'s linear layers; returns ``model``.

    Args:
        model: a Hugging Face causal LM (changed in place: targeted ``nn.Linear`` become
            ``MultiLoRALinear``; every base weight is frozen).
        spec: the adapter (default ``AdapterSpec(rank=16, alpha=32)``); its ``lr`` etc. are
            ignored, TRL's ``GRPOConfig`` drives the optimiser.
        target_modules: as ``MultiLoRAModel`` (``"all-linear"``, suffixes or a regex).

    Returns:
        The same model object: its ``parameters()`` now include the adapter (registered as the
        submodule ``lora_engine_bank``, the only tensors with ``requires_grad``), and
        ``model.lora_engine`` is the ``MultiLoRAModel`` holding it (adapter id 0).
    """
    if getattr(model, "lora_engine", None) is not None:
        raise ValueError("this model is already wrapped by wrap_for_trl; wrap a fresh model")
    engine = MultiLoRAModel(model, [spec if spec is not None else AdapterSpec(rank=16, alpha=32)],
                            target_modules=target_modules)
    state = _SingleAdapterRouting()
    engine.state = state
    for mod in model.modules():
        if isinstance(mod, MultiLoRALinear):
            object.__setattr__(mod, "state", state)
    model.add_module("lora_engine_bank", engine.bank)
    # A plain attribute, not a submodule: the engine holds the model (a cycle otherwise).
    object.__setattr__(model, "lora_engine", engine)
    return model


def _engine_of(model: nn.Module) -> MultiLoRAModel:
    engine = getattr(model, "lora_engine", None)
    if engine is None or not isinstance(engine.state, _SingleAdapterRouting):
        raise ValueError("the model carries no lora-engine adapter: wrap it first with wrap_for_trl(model, spec)")
    return engine


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """Inside the block ``model`` is its frozen base (the reference policy)."""
    state = _engine_of(model).state
    ids = state.adapter_ids
    state.adapter_ids = None
    try:
        yield model
    finally:
        state.adapter_ids = ids


class _AdapterOff(nn.Module):
    """The wrapped model with its adapter off: the KL reference at no extra memory."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.policy = model

    def forward(self, *args, **kwargs):
        with adapter_disabled(self.policy):
            return self.policy(*args, **kwargs)


def check_trl_args(args) -> None:
    """Raise ``ValueError`` for ``GRPOConfig`` settings the fused path does not implement."""
    bad = []
    if args.loss_type not in LOSS_TYPES:
        bad.append(f"loss_type={args.loss_type!r} (use one of {tuple(LOSS_TYPES)})")
    if args.top_entropy_quantile < 1.0:
        bad.append("top_entropy_quantile < 1 (the entropy mask; leave it at 1.0)")
    if args.off_policy_mask_threshold is not None:
        bad.append("off_policy_mask_threshold (leave it None)")
    if args.use_vllm:
        bad.append("use_vllm=True (TRL's vLLM sync does not know MultiLoRALinear; use "
                   "lora_engine.interop.vllm.VLLMRollout with the lora-engine trainer or client)")
    if getattr(args, "entropy_coef", 0.0) or getattr(args, "use_adaptive_entropy", False):
        bad.append("an entropy bonus (entropy_coef=0, no adaptive entropy)")
    if args.sync_ref_model:
        bad.append("sync_ref_model=True (the reference is the frozen base, adapter off)")
    if bad:
        raise ValueError("LoraEngineGRPOTrainer does not support: " + "; ".join(bad) +
                         ". Use trl.GRPOTrainer for these, or change the settings.")


def check_model(model: nn.Module) -> None:
    """The fused path computes logits as ``h @ W_lm^T / temperature``: refuse other heads."""
    cfg = model.config.get_text_config()
    odd = {k: getattr(cfg, k) for k in _LOGIT_TRANSFORMS if getattr(cfg, k, None) not in (None, 1.0)}
    if odd:
        raise ValueError(f"the model's config sets {odd}, which the fused log-prob path does not apply; "
                         "use trl.GRPOTrainer with a PEFT adapter for this model")
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("the LM head has a bias, which the fused log-prob path does not add; "
                         "use trl.GRPOTrainer with a PEFT adapter for this model")
    if getattr(cfg, "output_router_logits", False):
        raise ValueError("MoE router aux loss is not supported by the fused path; set output_router_logits=False")


class LoraEngineGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss runs on lora-engine's fused ops. Same arguments as TRL's.

    ``model`` must come from ``wrap_for_trl`` (an instance, not a name; no ``peft_config``).
    With ``args.beta > 0`` the reference log-probs come from the same model with the adapter
    off. Checkpoints hold the adapter in PEFT format (``adapter_config.json`` +
    ``adapter_model.safetensors``), not the full model.
    """

    def __init__(self, model, *args, **kwargs):
        engine = _engine_of(model)
        if kwargs.get("peft_config") is not None:
            raise ValueError("pass no peft_config: the adapter comes from wrap_for_trl(model, spec)")
        check_model(model)
        targs = kwargs.get("args")
        if targs is None:
            raise ValueError("pass args=GRPOConfig(...) explicitly (TRL's default output_dir needs a model name)")
        check_trl_args(targs)
        beta = targs.beta
        if beta != 0.0:
            # TRL would load a second model from the config's path as the reference; the frozen
            # base with the adapter off is that reference already, so build without, then set it.
            # A shallow copy, not dataclasses.replace: GRPOConfig.__post_init__ must not run twice.
            kwargs["args"] = copy.copy(targs)
            kwargs["args"].beta = 0.0
        if targs.gradient_checkpointing:
            # Reentrant checkpointing only back-propagates into blocks whose inputs need grad.
            model.enable_input_require_grads()
        super().__init__(model, *args, **kwargs)
        self.lora_engine = engine
        if beta != 0.0:
            self.args.beta = beta
            self.beta = beta
            self.ref_model = _AdapterOff(self.model)

    # -- the loss -----------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        """TRL's GRPO loss for ``inputs`` (the dict of ``_generate_and_score_completions``).

        Keys read: ``prompt_ids``/``prompt_mask`` [B, P], ``completion_ids``/``completion_mask``
        [B, C], ``advantages`` [B], optional ``old_per_token_logps`` and ``ref_per_token_logps``
        [B, C] fp32, ``num_items_in_batch`` (dapo), optional ``tool_mask`` [B, C].
        Returns the scalar loss TRL's own ``_compute_loss`` returns for the same inputs.
        """
        extra = [k for k in ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids")
                 if inputs.get(k) is not None]
        if extra:
            raise ValueError(f"inputs carry {extra}: multimodal inputs are not supported by LoraEngineGRPOTrainer")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        B, C = completion_ids.shape
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise ValueError(f"advantages must be [B] (one per completion), got {tuple(advantages.shape)}")

        # Through the (possibly DDP-wrapped) model, so distributed hooks run; logits_to_keep=1
        # keeps the model's own head to one position, the fused op does the rest.
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        logits_to_keep=1, use_cache=False)
        hidden = out.hidden_states[-1][:, -C - 1:-1, :]                    # [B, C, d] predicts completion
        head = self.accelerator.unwrap_model(model).get_output_embeddings().weight.detach()
        logp, entropy = ops.masked_token_logprobs(hidden.to(head.dtype), head, completion_ids, mask,
                                                  temperature=self.temperature, return_entropy=True)
        entropy = entropy.detach()

        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        args = self.args
        losses, metrics = ops.policy_loss(
            logp, old, advantages.float(), mask, torch.zeros(B, dtype=torch.long, device=logp.device),
            ref_logp=ref, loss_type=self.loss_type, eps_low=self.epsilon_low, eps_high=self.epsilon_high,
            delta=args.delta, beta=self.beta, importance_level=self.importance_sampling_level, num_adapters=1,
            max_completion_length=max(self.max_completion_length, C), kl_correction=bool(args.use_bias_correction_kl),
            sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg)
        mode = "train" if self.model.training else "eval"
        loss = losses[0] * self._trl_scale(mask, inputs, mode, C)
        self._log_loss_metrics(mode, metrics, entropy, mask)
        return loss

    def _trl_scale(self, mask, inputs, mode: str, C: int) -> float | torch.Tensor:
        """Factor from ``ops.policy_loss``'s per-adapter normalisation to TRL's for this micro-batch.

        ops divides by ``loss_normalisers`` (the loss type's count over this micro-batch), which
        is TRL's own divisor for grpo, bnpo, dr_grpo, sapo and luspo, then divided by the gradient
        accumulation steps in training. TRL divides dapo, cispo and vespo by the generation
        batch's token count instead: ``num_items_in_batch / num_processes * accumulation /
        steps_per_generation`` in training, ``num_items_in_batch / num_processes`` in eval. A
        batch wider than ``max_completion_length`` (C columns) gave dr_grpo C as its length: TRL
        still divides by max_completion_length.
        """
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "dr_grpo":
            return max(self.max_completion_length, C) / self.max_completion_length / accum
        if self.loss_type not in ("dapo", "cispo", "vespo"):
            return 1.0 / accum
        ours = loss_normalisers(torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device), mask, 1,
                                self.loss_type)[0][0]
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return ours.to(normalizer.dtype) / normalizer

    def _log_loss_metrics(self, mode: str, metrics: dict, entropy: torch.Tensor, mask: torch.Tensor) -> None:
        """TRL's token-weighted global means: sum and count reduced over processes."""
        count = mask.sum().float()

        def global_mean(local_mean):
            totals = self.accelerator.reduce(torch.stack([local_mean.float() * count, count]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_mean(metrics["kl_mean"][0]))
        self._metrics[mode]["entropy"].append(global_mean((entropy * mask).sum() / count.clamp(min=1.0)))
        if SURROGATE[self.loss_type] == "clip":
            for ours, theirs in (("clip_frac_low", "low_mean"), ("clip_frac_high", "high_mean"),
                                 ("clip_frac", "region_mean")):
                self._metrics[mode][f"clip_ratio/{theirs}"].append(global_mean(metrics[ours][0]))
        elif self.loss_type == "cispo":
            self._metrics[mode]["cispo_clip_ratio"].append(global_mean(metrics["clip_frac_high"][0]))

    # -- checkpoints: the adapter only, in PEFT format ------------------------------------------
    def save_adapter(self, directory) -> None:
        """Write the trained adapter as a PEFT LoRA directory (loads with PeftModel and vLLM)."""
        base = getattr(self.lora_engine.model.config, "_name_or_path", None) or None
        peft_format.save_adapter(self.lora_engine, 0, directory, base_model_name=base)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.save_adapter(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        peft_format.load_adapter_weights(self.lora_engine, 0, resume_from_checkpoint)
