"""A Tinker-style client API: many adapter handles on one frozen base, for your own RL loop.

    client = le.Client(base_model, tokenizer)              # one base model (le.Engine: the same)
    a, b = client.create_adapter(rank=8, seed=0), client.create_adapter(rank=32, seed=1)
    samples = client.sample(prompts, adapter=a, n=8, temperature=1.0)   # tokens + sampling log-probs
    fa = a.forward_backward(samples.to_batch(advantages=adv_a), loss="importance_sampling")
    fb = b.forward_backward(batch_b, loss="ppo")           # queued, nothing computed yet
    a.optim_step(lr=1e-4)                                  # runs a's and b's work in ONE base
    b.optim_step(lr=3e-5)                                  # forward + backward, then steps a; b reuses it
    fa.result().loss, fa.result().logprobs                 # futures resolve at the first flush
    a.save_state("ckpt/a"); a2 = client.load_state("ckpt/a")   # weights (PEFT format) + optimizer

Batching rule: ``forward_backward`` only queues. The queue runs as one base forward and one
backward over every queued (adapter, batch, loss), each sequence routed to its own adapter,
when any handle calls ``optim_step``, when a result is read, or on ``client.flush()``.
``client.forward_backward_many([(a, batch, loss), ...])`` runs a list at once. Gradients
accumulate until that adapter's ``optim_step`` (as ``loss.backward()`` would); each adapter's
gradient is the one it would get alone, because its loss reads only its own sequences.

Losses are sums over tokens (Tinker's convention; scale ``weights`` for a mean): Tinker's
"cross_entropy", "importance_sampling", "ppo", "cispo" and "dro" with per-token or per-sequence
advantages and their ``loss_config`` (formulas: ``lora_engine.interop.batches``), the client's
"grpo" ("ppo" with group-normalised rewards as advantages, on the fused policy-loss kernel; with
``loss_type=`` any of TRL 1.16's eight loss types, TRL's normaliser instead of a sum), or a
callable ``loss_fn(logprobs [B, L] fp32 with grad, batch) -> scalar tensor``. ``forward`` computes
the same outputs without a gradient, in the same base forward as the queued backward work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from lora_engine import ops
from lora_engine.engine import peft_format
from lora_engine.engine.optimizer import AdapterOptimizer, BankAdamW
from lora_engine.interop.batches import (  # noqa: F401  (LOSSES, Samples: part of this module's API)
    LOSS_CONFIG, LOSSES, Batch, ForwardBackwardOutput, Samples, token_loss, trl_loss_config)
from lora_engine.engine.spec import AdapterSpec
from lora_engine.rl.advantages import group_advantages
from lora_engine.engine.model import MultiLoRAModel
from lora_engine.rl.models import load_base
from lora_engine.rl.rollout import generate

STATE_FILE, OPTIMIZER_FILE = "client_state.json", "optimizer.safetensors"


class ForwardBackwardFuture:
    """A queued forward_backward; ``result()`` runs the queue if it has not run yet."""

    def __init__(self, client: "Client"):
        self._client = client
        self._output: ForwardBackwardOutput | None = None

    @property
    def done(self) -> bool:
        return self._output is not None

    def result(self) -> ForwardBackwardOutput:
        if self._output is None:
            self._client.flush()
        if self._output is None:
            raise ValueError("this forward_backward was lost: its queue raised an exception when it ran "
                             "(see that error); queue it again")
        return self._output


@dataclass
class _Work:
    adapter: "Adapter"
    batch: Batch
    loss: str | Callable
    loss_kwargs: dict
    future: ForwardBackwardFuture
    forward_only: bool = False


# --- handles ------------------------------------------------------------------------------------

class Adapter:
    """A handle on one adapter of a ``Client``: queue work, step its own AdamW, save it."""

    def __init__(self, client: "Client", adapter_id: int):
        self.client = client
        self.id = adapter_id
        self.step = 0
        self.sample_calls = 0
        self.optimizer: AdapterOptimizer | None = None

    @property
    def spec(self) -> AdapterSpec:
        return self.client.engine.adapter_spec(self.id)

    def parameters(self) -> list[torch.nn.Parameter]:
        return self.client.engine.adapter_parameters(self.id)

    def forward_backward(self, batch: Batch, loss="importance_sampling", *, temperature: float = 1.0,
                         eps_low: float = 0.2, eps_high: float = 0.2, loss_config: dict | None = None,
                         loss_type: str | None = None, forward_only: bool = False) -> ForwardBackwardFuture:
        """Queue loss + gradient for this adapter on ``batch``; see the module docstring.

        ``temperature`` divides the logits when recomputing log-probs (use the sampling
        temperature); ``eps_low``/``eps_high`` are the clip range of "ppo" and "grpo";
        ``loss_config``: Tinker's settings (``clip_low_threshold``/``clip_high_threshold`` for
        "ppo"/"cispo", ``beta`` for "dro"), overriding the eps. ``loss_type`` (with loss "grpo"):
        TRL 1.16's ``GRPOConfig.loss_type`` (``batches.trl_loss_config``). ``forward_only``: see ``forward``.
        """
        batch.check(loss, loss_config)
        fut = ForwardBackwardFuture(self.client)
        if loss_type is not None:
            config = trl_loss_config(loss, loss_type, loss_config)
        else:
            config = dict(LOSS_CONFIG.get(loss, {}) if isinstance(loss, str) else {})
            if loss == "ppo":
                config.update(clip_low_threshold=1.0 - eps_low, clip_high_threshold=1.0 + eps_high)
            config.update({k: v for k, v in (loss_config or {}).items() if k in config})
        self.client._queue.append(_Work(self, batch, loss, dict(temperature=temperature, eps_low=eps_low,
                                                                eps_high=eps_high, config=config,
                                                                loss_type=loss_type), fut, forward_only))
        return fut

    def forward(self, batch: Batch, loss="cross_entropy", **kwargs) -> ForwardBackwardFuture:
        """Queue ``forward_backward``'s outputs (loss, log-probs, metrics) with no gradient."""
        return self.forward_backward(batch, loss, forward_only=True, **kwargs)

    def optim_step(self, lr: float = 1e-4, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                   grad_clip: float | None = 1.0) -> dict:
        """Run the client's queued work, then one AdamW step on this adapter and clear its grads.

        ``lr`` is A's learning rate; B (and 1-D tensors: DoRA's m, VeRA's d, b) step at
        ``lr * spec.lora_plus_ratio`` (1 unless the adapter is LoRA+). ``grad_clip``: max global
        norm over this adapter's gradients (None: no clipping). Returns ``{"step", "grad_norm",
        "skipped"}``: a non-finite gradient skips the step (the grads are cleared all the same),
        as the trainer does.
        """
        self.client.flush()
        params = self.parameters()
        if all(p.grad is None for p in params):
            raise ValueError(f"adapter {self.id} has no gradient: call forward_backward before optim_step")
        if self.optimizer is None:
            self.optimizer = self._new_optimizer()
        for g, rate in zip(self.optimizer.param_groups, (lr, lr * self.spec.lora_plus_ratio)):
            g.update(lr=rate, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        # The bank's fused AdamW on this adapter's slices alone: clipping, the non-finite skip, the step.
        norm, skipped = self.optimizer.step(None if grad_clip is None else grad_clip)
        if not skipped:
            self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": self.step, "grad_norm": norm, "skipped": skipped}

    def save_state(self, directory) -> Path:
        """Weights (PEFT format, loads with PeftModel and vLLM), optimizer state and counters."""
        directory = Path(directory)
        peft_format.save_adapter(self.client.engine, self.id, directory)
        meta = {"step": self.step, "sample_calls": self.sample_calls, "param_groups": None}
        if self.optimizer is not None:
            sd = self.optimizer.state_dict()
            save_file({f"{pid}.{k}": v.detach().cpu().contiguous() for pid, st in sd["state"].items()
                       for k, v in st.items()}, str(directory / OPTIMIZER_FILE))
            meta["param_groups"] = sd["param_groups"]
        (directory / STATE_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    def load_state(self, directory, optimizer: bool = True) -> None:
        """Overwrite this adapter's weights with ``save_state``'s (or a PEFT directory of the same
        spec), and its optimizer state too with ``optimizer`` (else AdamW starts afresh)."""
        directory = Path(directory)
        peft_format.load_adapter_weights(self.client.engine, self.id, directory)
        for p in self.parameters():
            p.grad = None
        self.optimizer = None
        if optimizer:
            if not (directory / OPTIMIZER_FILE).exists():
                raise ValueError(f"{directory} has no optimizer state (weights only): load it with optimizer=False")
            self._load_optimizer(directory)

    def _load_optimizer(self, directory: Path) -> None:
        meta = json.loads((directory / STATE_FILE).read_text()) if (directory / STATE_FILE).exists() else {}
        self.step, self.sample_calls = meta.get("step", 0), meta.get("sample_calls", 0)
        if not meta.get("param_groups"):
            return
        flat = load_file(str(directory / OPTIMIZER_FILE))
        state: dict[int, dict] = {}
        for key, t in flat.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = t
        groups = [{**g, "betas": tuple(g["betas"])} for g in meta["param_groups"]]
        params = self.parameters()
        if sum(len(g["params"]) for g in groups) != len(params):
            raise ValueError(f"{directory}: the optimizer state has {sum(len(g['params']) for g in groups)} "
                             f"tensors but the adapter has {len(params)}; was it saved from another adapter?")
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})

    def _new_optimizer(self) -> AdapterOptimizer:
        # This adapter's share of the bank's fused AdamW; two groups as the trainer's: A-like
        # tensors, then B-like ones (LoRA+ rate). torch AdamW's defaults until optim_step sets them.
        opt = BankAdamW.of(self.client.engine.bank)
        opt.configure(self.id, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
        return opt.adapter(self.id)


# --- the client ---------------------------------------------------------------------------------

class Client:
    """One frozen base model; any number of adapter handles; batched work across handles.

    Args:
        base_model: a Hugging Face causal LM instance, or the path of a local one (then its
            tokenizer is loaded too).
        tokenizer: for string prompts and decoded ``Samples.text``; optional with token ids.
        target_modules: linear layers adapters may use (as ``MultiLoRAModel``).
        eos_id, pad_id: default from the tokenizer, then the model's generation config.
    """

    def __init__(self, base_model, tokenizer=None, *, target_modules="all-linear", eos_id: int | None = None,
                 pad_id: int | None = None):
        if isinstance(base_model, (str, Path)):
            base_model, own_tokenizer = load_base(str(base_model), device="cpu")
            tokenizer = tokenizer or own_tokenizer
        self.engine = MultiLoRAModel(base_model, [], target_modules=target_modules)
        self.tokenizer = tokenizer
        gen = getattr(base_model, "generation_config", None)
        eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
        eos = eos if eos is not None else getattr(gen, "eos_token_id", None)
        self.eos_id = eos[0] if isinstance(eos, list) else eos
        pad = pad_id if pad_id is not None else getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(gen, "pad_token_id", None)
        self.pad_id = pad if pad is not None else self.eos_id
        if self.eos_id is None:
            raise ValueError("no EOS token id: pass a tokenizer or eos_id=...")
        self.adapters: list[Adapter] = []
        self._queue: list[_Work] = []
        self._base_sample_calls = 0

    # -- adapters --------------------------------------------------------------------------------
    def create_adapter(self, rank: int = 8, alpha: float = 32.0, seed: int = 0, **spec_kwargs) -> Adapter:
        """A new adapter, ``AdapterSpec(rank, alpha, seed, **spec_kwargs)`` (method, scaling,
        init, target_modules, rank_pattern, name...); every method starts as the base model.
        The spec's ``lr``/``weight_decay`` are unused here: ``optim_step`` takes them per call."""
        return self._handle(self.engine.add_adapter(AdapterSpec(rank=rank, alpha=alpha, seed=seed, **spec_kwargs)))

    def load_state(self, directory) -> Adapter:
        """A new handle from ``Adapter.save_state`` (or any PEFT LoRA directory: weights only)."""
        directory = Path(directory)
        handle = self._handle(self.engine.load_adapter(directory))
        handle._load_optimizer(directory)
        return handle

    def _handle(self, i: int) -> Adapter:
        handle = Adapter(self, i)
        self.adapters.append(handle)
        return handle

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts, adapter: Adapter | list | None = None, n: int = 1, temperature: float = 1.0,
               top_p: float = 1.0, max_new_tokens: int = 32, greedy: bool = False) -> Samples:
        """``n`` completions per prompt, all adapters of the call in one decoding batch.

        Args:
            prompts: list of strings (needs the tokenizer) or of token-id lists.
            adapter: one handle for every prompt, a list with one handle (or None) per prompt,
                or None for the base model.
            n, temperature, top_p, max_new_tokens, greedy: as ``lora_engine.rl.rollout.generate``.
        Each call draws new random numbers from (adapter seed, that adapter's call count).
        """
        prompt_ids = [self._encode(p) for p in prompts]
        per_prompt = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} adapters for {len(prompts)} prompts: give one per prompt")
        rows = [(j, per_prompt[j]) for j in range(len(prompts)) for _ in range(n)]
        handles = {id(a): a for _, a in rows}
        seeds = {}
        for a in handles.values():
            if a is None:
                seeds[-1] = (self._base_sample_calls * 7_919 + 1) % 2**63
                self._base_sample_calls += 1
            else:
                seeds[a.id] = (a.spec.seed * 1_000_003 + a.sample_calls * 7_919 + 1) % 2**63
                a.sample_calls += 1
        ro = generate(self.engine, [prompt_ids[j] for j, _ in rows], [-1 if a is None else a.id for _, a in rows],
                      eos_id=self.eos_id, pad_id=self.pad_id, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, greedy=greedy, seeds=seeds)
        lengths = ro.completion_mask.sum(-1).tolist()
        tokens = [ro.completion_ids[k, :lengths[k]].tolist() for k in range(len(rows))]
        text = self.tokenizer.batch_decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return Samples(prompt_tokens=[prompt_ids[j] for j, _ in rows], tokens=tokens,
                       logprobs=[ro.sampling_logp[k, :lengths[k]].tolist() for k in range(len(rows))],
                       prompt_index=[j for j, _ in rows], adapters=[a for _, a in rows],
                       truncated=ro.truncated.tolist(), text=text, pad_id=self.pad_id)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer: Client(model, tokenizer) or pass token ids")
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return [int(t) for t in prompt]

    # -- forward/backward --------------------------------------------------------------------------
    def flush(self) -> None:
        """Run every queued forward_backward (one base forward + backward) and resolve the futures."""
        queue, self._queue = self._queue, []
        if queue:
            outputs = self._run(queue)
            for work, out in zip(queue, outputs):
                work.future._output = out

    def forward_backward_many(self, items) -> list[ForwardBackwardOutput]:
        """Run ``[(adapter, batch, loss), ...]`` now, in one base forward + backward (with any
        work already queued); returns one output per item."""
        futures = [a.forward_backward(batch, loss) for a, batch, loss in items]
        self.flush()
        return [f.result() for f in futures]

    def _run(self, queue: list[_Work]) -> list[ForwardBackwardOutput]:
        model = self.engine.model
        device = next(model.parameters()).device
        L = max(w.batch.input_ids.shape[1] for w in queue)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, L - t.shape[1]), value=v)  # noqa: E731
        ids = torch.cat([pad(w.batch.input_ids, self.pad_id) for w in queue]).to(device)
        attn = torch.cat([pad(w.batch.attention_mask if w.batch.attention_mask is not None
                              else torch.ones_like(w.batch.input_ids), 0) for w in queue]).to(device)
        owner = torch.cat([torch.full((w.batch.input_ids.shape[0],), w.adapter.id, dtype=torch.long) for w in queue])
        # Forward-only items are part of the same base forward; without backward work, no graph.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not all(w.forward_only for w in queue)):
            hidden = self.engine.hidden_states(ids, attn, owner)
            total, outputs, row = None, [], 0
            for w in queue:
                B, Lw = w.batch.input_ids.shape
                logp = self._logprobs(w, hidden[row:row + B, :Lw], ids[row:row + B, :Lw], attn[row:row + B, :Lw])
                keep = (attn[row:row + B, :Lw] != 0) if callable(w.loss) or w.batch.target_ids is not None \
                    else (w.batch.weights.to(device) != 0)
                row += B
                loss, metrics = self._loss(w, logp, w.batch.weights.to(device))
                metrics["tokens"] = float(keep.sum() if w.batch.target_ids is not None else keep[:, 1:].sum())
                outputs.append(ForwardBackwardOutput(float(loss.detach()), logp.detach(), metrics))
                if not w.forward_only:
                    total = loss if total is None else total + loss
        if total is not None and total.requires_grad:
            total.backward()
        return outputs

    def _logprobs(self, w: _Work, hidden, ids, attn) -> torch.Tensor:
        """[B, L] log-probs of one item: of ``ids[t]`` from ``< t`` where scored (the nonzero
        weights; every attended token for a callable loss), or of ``target_ids[t]`` from ``<= t``
        on every attended token (Tinker's alignment, which returns them all)."""
        T = w.loss_kwargs["temperature"]
        if w.batch.target_ids is not None:
            return self.engine.logprobs_from_hidden(hidden, ids, attn != 0, temperature=T,
                                                    targets=w.batch.target_ids.to(ids.device))
        keep = (attn != 0) if callable(w.loss) else (w.batch.weights.to(ids.device) != 0)
        return self.engine.logprobs_from_hidden(hidden, ids, keep, temperature=T)

    @staticmethod
    def _loss(w: _Work, logp: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One item's loss (a sum over tokens, see the module docstring) and its metrics."""
        if callable(w.loss):
            return w.loss(logp, w.batch), {}
        if w.loss != "grpo":
            return token_loss(w.loss, logp, w.batch, weights, w.loss_kwargs["config"])
        b = w.batch
        adv = group_advantages(b.rewards, b.group_ids, scale="std")[0]
        B, L = logp.shape
        if w.loss_kwargs["loss_type"] is not None:  # TRL's loss of that type over this batch, normalised as TRL
            options = dict(w.loss_kwargs["config"])
            mcl = options.pop("max_completion_length")
            losses, m = ops.policy_loss(logp, b.sampling_logprobs.to(logp.device), adv.to(logp.device, torch.float32),
                                        weights, torch.zeros(B, dtype=torch.long, device=logp.device),
                                        loss_type=w.loss_kwargs["loss_type"], eps_low=w.loss_kwargs["eps_low"],
                                        eps_high=w.loss_kwargs["eps_high"], num_adapters=1,
                                        max_completion_length=mcl, **options)
            return losses[0], {"ratio_mean": float(m["ratio_mean"][0]), "clip_frac": float(m["clip_frac"][0])}
        # dr_grpo divides by B * L exactly (no clamp on the token count), so times B * L is the sum
        # over tokens for any weights, fractional ones included.
        losses, m = ops.policy_loss(logp, b.sampling_logprobs.to(logp.device), adv.to(logp.device, torch.float32),
                                    weights, torch.zeros(B, dtype=torch.long, device=logp.device), loss_type="dr_grpo",
                                    eps_low=w.loss_kwargs["eps_low"], eps_high=w.loss_kwargs["eps_high"],
                                    num_adapters=1)
        return losses[0] * (B * L), {"ratio_mean": float(m["ratio_mean"][0]), "clip_frac": float(m["clip_frac"][0])}


# The client's first name; kept so existing code runs unchanged.
Engine = Client
