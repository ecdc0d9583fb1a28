"""Attach a bank of LoRA adapters to any Hugging Face causal LM.

    engine = MultiLoRAModel(model, [AdapterSpec(rank=1), AdapterSpec(rank=64, method="dora")],
                            target_modules="all-linear")
    out = engine(input_ids, attention_mask=mask, adapter_ids=torch.tensor([0, 1, -1, 0]))

The base weights are frozen and stored once. Targeted ``nn.Linear`` modules are replaced, on
this model instance, by ``MultiLoRALinear`` wrappers that read the per-batch routing; nothing
in transformers' classes is patched.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from lora_engine import ops
from lora_engine.engine.bank import AdapterBank
from lora_engine.engine.spec import AdapterSpec, matches
from lora_engine.engine.layers import MultiLoRALinear, RoutingState

# Never adapted: the output head (the fused log-prob kernel reads it frozen) and embeddings.
EXCLUDED = ("lm_head",)


class MultiLoRAModel(nn.Module):
    """One frozen base model, many LoRA adapters; each sequence of a batch picks its own.

    Args:
        model: a Hugging Face causal LM (Qwen3, Llama, Qwen2, ...), any dtype/device.
        adapters: initial ``AdapterSpec`` list; their ids are 0, 1, ... in order.
        target_modules: ``"all-linear"`` (every nn.Linear but the LM head, as PEFT), a list of
            module-name suffixes (``["q_proj", "v_proj"]``) or a regex matched against full names.
            Adapters may target a subset of these with ``AdapterSpec.target_modules``.
        adapter_dtype: dtype of the trainable adapter weights (fp32 master weights by default);
            they are cast to the activation dtype inside each layer.
    """

    def __init__(self, model: nn.Module, adapters: list[AdapterSpec] | None = None,
                 target_modules="all-linear", adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.bank = AdapterBank(adapter_dtype)
        self.bank.default_targets = "all-linear"
        self.state = RoutingState()
        self.target_modules = target_modules
        self._wrap(target_modules)
        self.add_adapters(adapters or [])

    def _wrap(self, targets) -> None:
        found = []
        for name, mod in list(self.model.named_modules()):
            if not isinstance(mod, nn.Linear) or isinstance(mod, MultiLoRALinear):
                continue
            if name.split(".")[-1] in EXCLUDED or not matches(name, targets):
                continue
            found.append((name, mod))
        if not found:
            raise ValueError(f"target_modules={targets!r} matched no nn.Linear in the model: use "
                             "'all-linear' or suffixes such as ['q_proj', 'v_proj']")
        for name, mod in found:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, MultiLoRALinear(mod, name, self.bank, self.state))
            self.bank.register_module_info(name, mod.in_features, mod.out_features, mod.weight.device,
                                           weight=mod.weight)

    def detach(self) -> nn.Module:
        """Put the original ``nn.Linear`` modules back and return the plain base model."""
        for name, mod in list(self.model.named_modules()):
            if isinstance(mod, MultiLoRALinear):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, mod.base)
        return self.model

    # -- adapters ------------------------------------------------------------------------
    def add_adapter(self, spec: AdapterSpec) -> int:
        """Add an adapter between steps; returns its id (ids are never reused)."""
        if not isinstance(spec, AdapterSpec):
            raise ValueError(f"expected an AdapterSpec, got {type(spec).__name__}: wrap it as "
                             "le.AdapterSpec(rank=...)")
        return self.bank.add(spec)

    def add_adapters(self, specs) -> list[int]:
        """Add several adapters, laying the bank's buffers out once (not once per adapter)."""
        with self.bank.deferred():
            return [self.add_adapter(spec) for spec in specs]

    def remove_adapter(self, i: int) -> None:
        self.bank.remove(i)

    def remove_adapters(self, ids) -> None:
        """Remove several adapters, laying the bank's buffers out once."""
        with self.bank.deferred():
            for i in ids:
                self.bank.remove(i)

    def adapter_parameters(self, i: int) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``i`` only (A and B of every module it targets for LoRA;
        DoRA adds m, VeRA has d and b, ``full`` its dW; frozen ones such as LoRA-FA's A are left out)."""
        return self.bank.parameters_of(i)

    def adapter_spec(self, i: int) -> AdapterSpec:
        if i not in self.bank.specs:
            raise ValueError(f"no adapter with id {i}; present: {self.bank.ids()}")
        return self.bank.specs[i]

    @property
    def adapter_ids(self) -> list[int]:
        return self.bank.ids()

    @property
    def num_adapters(self) -> int:
        return len(self.bank.specs)

    # -- forward -------------------------------------------------------------------------
    def _check_ids(self, adapter_ids) -> torch.Tensor:
        ids = torch.as_tensor(adapter_ids).reshape(-1)
        if ids.dtype.is_floating_point:
            raise ValueError("adapter_ids must be integers (one id per sequence, -1 = base only)")
        # Vectorised membership test: one lookup table (index_select, not a Python set probe per
        # sequence); the bad ids are listed only when there are some.
        flat = ids.detach().cpu().long()
        A = self.bank.num_slots
        present = torch.zeros(A + 2, dtype=torch.bool)  # slot k + 1 for id k; A + 1: out of range
        present[torch.tensor(self.bank.ids(), dtype=torch.long) + 1] = True
        present[0] = True  # -1: the base model
        ok = present.index_select(0, torch.where((flat >= -1) & (flat < A), flat + 1, A + 1))
        bad = [] if bool(ok.all()) else sorted(set(flat[~ok].tolist()))
        if bad:
            raise ValueError(f"adapter id(s) {bad} are not in the bank (present: {sorted(present)}); "
                             "use -1 for the base model or add the adapter first")
        return ids

    @contextlib.contextmanager
    def use_adapters(self, adapter_ids):
        """Route every forward inside the block: sequence b uses adapter ``adapter_ids[b]``.

        Used for generation (each decoding step reuses the ids).
        """
        ids = self._check_ids(adapter_ids)
        self.state.set(ids, self.bank.num_slots)
        try:
            yield self
        finally:
            self.state.set(None, 0)

    def forward(self, input_ids=None, attention_mask=None, adapter_ids=None, **kwargs):
        """Run the base model with per-sequence adapters.

        Args:
            input_ids: [B, L] token ids. attention_mask: [B, L] or None.
            adapter_ids: [B] ints, one per sequence, in the bank's ids or -1 (base only).
                None: the base model alone.
            kwargs: passed to the Hugging Face model (``logits_to_keep``, ``past_key_values``...).
        """
        if adapter_ids is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is not None and torch.as_tensor(adapter_ids).numel() != input_ids.shape[0]:
            raise ValueError(f"adapter_ids has {torch.as_tensor(adapter_ids).numel()} entries for a batch "
                             f"of {input_ids.shape[0]} sequences: give one id per sequence")
        with self.use_adapters(adapter_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def hidden_states(self, input_ids, attention_mask, adapter_ids) -> torch.Tensor:
        """[B, L, d] last hidden states, each row under its own adapter (-1: the base). Position
        ids follow the attention mask, so left padding is harmless."""
        model = self.model
        decoder = getattr(model, model.base_model_prefix)
        pos = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        with self.use_adapters(adapter_ids):
            return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).last_hidden_state

    def logprobs_from_hidden(self, hidden, input_ids, score_mask, temperature: float = 1.0,
                             return_entropy: bool = False, targets=None):
        """``out[b, l] = log p(input_ids[b, l] | input_ids[b, :l])`` from ``hidden`` [B, L, d] where
        ``score_mask[b, l] != 0`` (column 0 has no context and is never scored), 0 elsewhere. With
        ``targets`` [B, L] (Tinker's alignment): ``out[b, l] = log p(targets[b, l] | input_ids[b, :l+1])``.

        Only scored positions go through the LM head (``ops.masked_token_logprobs``: no [T, V]
        logits on the GPU path). Returns logp [B, L] fp32, or (logp, entropy) with ``return_entropy``.
        """
        head = self.model.get_output_embeddings().weight
        if targets is not None:
            return ops.masked_token_logprobs(hidden, head, targets, score_mask, temperature=temperature,
                                             return_entropy=return_entropy)
        res = ops.masked_token_logprobs(hidden[:, :-1], head,
                                        input_ids[:, 1:], score_mask[:, 1:], temperature=temperature,
                                        return_entropy=return_entropy)
        res = res if return_entropy else (res,)
        full = tuple(torch.nn.functional.pad(r, (1, 0)) for r in res)
        return full if return_entropy else full[0]

    def sequence_logprobs(self, input_ids, attention_mask, adapter_ids, score_mask, temperature: float = 1.0,
                          return_entropy: bool = False):
        """``hidden_states`` then ``logprobs_from_hidden``: per-token log-probs of ``input_ids``
        ([B, L] like ``attention_mask`` and ``score_mask``; ``adapter_ids`` [B]) from one decoder pass."""
        hidden = self.hidden_states(input_ids, attention_mask, adapter_ids)
        return self.logprobs_from_hidden(hidden, input_ids, score_mask, temperature, return_entropy)

    # -- PEFT format -----------------------------------------------------------------------
    def save_adapter(self, i: int, directory, base_model_name: str | None = None):
        """Write adapter ``i`` as a PEFT LoRA directory (see ``lora_engine.engine.peft_format.save_adapter``)."""
        from lora_engine.engine import peft_format

        return peft_format.save_adapter(self, i, directory, base_model_name=base_model_name)

    def load_adapter(self, directory) -> int:
        """Add the PEFT LoRA adapter in ``directory``; returns its id (see ``peft_format.load_adapter``)."""
        from lora_engine.engine import peft_format

        return peft_format.load_adapter(self, directory)
