"""``MultiLoRALinear``: a frozen base ``nn.Linear`` plus the bank's adapters for that module;
``MultiNorm``: a frozen norm module plus the LayerNorm-tuning adapters' own weights."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from lora_engine import ops


class RoutingState:
    """The per-batch adapter context shared by every wrapped layer of one model.

    Holds one adapter id per sequence; the routing for a given (B, L) input is built on first
    use and reused by every layer of the same forward (and rebuilt when the shape changes, as
    between generation steps).
    """

    def __init__(self):
        self.adapter_ids: torch.Tensor | None = None
        self.num_slots = 0
        self._cache: dict = {}
        self.memo: dict = {}
        self._derived = weakref.WeakKeyDictionary()

    def set(self, adapter_ids: torch.Tensor | None, num_slots: int) -> None:
        self.adapter_ids = adapter_ids
        self.num_slots = num_slots
        self._cache = {}
        # Per-context values of the adapter weights (kernel pairs, DoRA norms), reused only under no_grad.
        self.memo = {}
        self._derived = weakref.WeakKeyDictionary()

    def routing_for(self, batch: int, seq_len: int, device):
        from lora_engine.engine.routing import build_routing

        key = (batch, seq_len, str(device))
        if key not in self._cache:
            if self.adapter_ids.numel() != batch:
                raise ValueError(f"adapter_ids has {self.adapter_ids.numel()} entries but the batch has "
                                 f"{batch} sequences: give one adapter id per sequence")
            self._cache[key] = build_routing(self.adapter_ids, seq_len, self.num_slots, device)
        return self._cache[key]

    def dense_rows(self, routing, full: torch.Tensor):
        """Rows of the full fine-tuning segments of ``routing``, padded: (rows [S_f, L] int64, valid
        [S_f, L] bool, dW row of each segment [S_f]), or (None, None, None) when none is routed.
        ``full``: [num_slots] dW row per slot (-1: not full fine-tuning). Built once per batch."""
        per = self._derived.setdefault(routing, {})
        key = ("dense", id(full))
        if key not in per:
            start, adapter = routing.segment_tensors()
            start, adapter = start.long(), adapter.long()
            which = full.index_select(0, adapter)
            seg = (which >= 0).nonzero().squeeze(1)
            if seg.numel() == 0:
                per[key] = (None, None, None, full)
            else:
                lo, n = start.index_select(0, seg), start.index_select(0, seg + 1) - start.index_select(0, seg)
                span = torch.arange(int(n.max()), device=lo.device)
                valid = span[None, :] < n[:, None]
                pos = torch.where(valid, lo[:, None] + span[None, :], torch.zeros_like(valid, dtype=torch.int64))
                rows = routing.token_idx.index_select(0, pos.reshape(-1)).view(pos.shape)
                per[key] = (rows, valid, which.index_select(0, seg), full)  # full: keeps id(full) unique
        return per[key][:3]


class _FrozenWrapper(nn.Module):
    """A frozen base module named ``name`` in the engine's bank, seen through as ``weight``/``bias``."""

    def __init__(self, base: nn.Module, name: str, bank, state: RoutingState):
        super().__init__()
        self.base = base
        self.name = name
        # Plain attributes, not submodules: the bank and state belong to the engine, once.
        object.__setattr__(self, "bank", bank)
        object.__setattr__(self, "state", state)
        for p in self.base.parameters():
            p.requires_grad_(False)

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return getattr(self.base, "bias", None)


class MultiLoRALinear(_FrozenWrapper):
    """Frozen base linear; with an active routing, adds each sequence's own adapter update.

    Outside an engine call (no routing set) it is exactly the base layer.
    """

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, K] -> [B, L, N]: base + each row's adapter (LoRA-family update in the packed
        kernel, DoRA's column scale as an epilogue, full fine-tuning's dense dW per segment).

        Per forward this does no work per adapter: the module's layout (bank) and the batch's
        routing (state) are built once, the kernel pair is the bank's buffers (LoRA family)."""
        if self.state.adapter_ids is None:
            return self.base(x)
        lay = self.bank.module_layout(self.name)
        if not lay.ids:
            return self.base(x)
        lead = x.shape[:-1]
        if len(lead) != 2:
            raise ValueError(f"{self.name}: expected [B, L, K] activations, got {tuple(x.shape)}")
        routing = self.state.routing_for(lead[0], lead[1], x.device)
        x, weight, bias = self._compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        # Generation (no grad) reuses the kernel pair and DoRA norms for every token; training
        # rebuilds them each forward, since an optimiser step may have changed the weights.
        memo = None if torch.is_grad_enabled() else self.state.memo
        ia3_in, ia3_out = lay.row_scale("in"), lay.row_scale("out")
        if ia3_in is not None:  # IA3 on a feedforward module: its adapters' rows of x scaled first
            x2 = ops.routed_scale(x2, self.bank.buffer(self.name, ia3_in.buffer), ia3_in.slot_row, routing)
        lora_a, lora_b = self.bank.kernel_pair(self.name, x.dtype, memo)
        y = ops.lora_linear(x2, weight, bias, lora_a, lora_b, lay.kernel, routing)
        if lay.dora is not None:
            scale = self.bank.dora_scale(self.name, self.base.weight, memo)
            y = ops.lora_column_scale(y, self.base.bias, scale, lay.dora.flags, routing)
        if lay.full is not None:
            y = self._dense(x2, y, routing, lay)
        if ia3_out is not None:  # IA3 elsewhere: the output rows, bias included (PEFT's)
            y = ops.routed_scale(y, self.bank.buffer(self.name, ia3_out.buffer), ia3_out.slot_row, routing)
        return y.reshape(*lead, -1)

    def _dense(self, x2, y, routing, lay):
        """y[t] += x[t] dW_a^T for the rows t of every full fine-tuning adapter a: one batched matmul
        over their segments padded to the longest (a segment's rows are gathered and scattered once)."""
        rows, valid, which = self.state.dense_rows(routing, lay.full)
        if rows is None:
            return y
        delta = self.bank.buffer(self.name, "delta_weight").to(x2.dtype)  # [n_full, N, K]
        xs = x2.index_select(0, rows.reshape(-1)).view(*rows.shape, -1) * valid[..., None].to(x2.dtype)
        out = torch.bmm(xs, delta.index_select(0, which).transpose(1, 2))
        keep = valid.reshape(-1)
        return y.index_add(0, rows.reshape(-1)[keep], out.reshape(-1, out.shape[-1])[keep].to(y.dtype))

    def _compute_dtype(self, x):
        """(x, weight, bias) in one dtype: autocast's if it is on (TRL's bf16=True on an fp32
        model), else the activations'. nn.Linear gets this from autocast; a custom autograd
        Function does not, and the kernels need one dtype."""
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w, b = self.base.weight, self.base.bias
        if w.dtype != dt:
            w = w.to(dt)
            b = b.to(dt) if b is not None else None
        return x.to(dt), w, b

    def extra_repr(self) -> str:
        return f"name={self.name}, in={self.in_features}, out={self.out_features}"


class MultiNorm(_FrozenWrapper):
    """Frozen norm module; the rows of LayerNorm-tuning adapters get the adapter's own weight
    and bias: out = n(x) * w_a + b_a, with n(x) the base norm at unit weight and zero bias (one
    more call of it, only when such an adapter is routed), every other row the base output.

    Holds for norms computing ``n(x) * weight (+ bias)`` (nn.LayerNorm, nn.RMSNorm, the HF
    RMSNorms of Llama/Qwen); ``check_affine`` refuses others (Gemma's ``(1 + weight)``).
    """

    def _unit(self, x):
        """The base norm at weight 1 and bias 0 (a functional call: the module is not changed)."""
        w, b = self.base.weight, self.bias
        params = {"weight": torch.ones_like(w)}
        if b is not None:
            params["bias"] = torch.zeros_like(b)
        return torch.func.functional_call(self.base, params, (x,))

    def check_affine(self) -> None:
        """ValueError unless the base output is n(x) * weight + bias (probed once, at wrap time)."""
        w = self.base.weight
        x = torch.randn(3, w.shape[-1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        with torch.no_grad():
            y, n = self.base(x), self._unit(x)
            want = n * w + (self.bias if self.bias is not None else 0)
        if not torch.allclose(y.float(), want.float(), rtol=1e-2, atol=1e-3):
            raise ValueError(f"{self.name} ({type(self.base).__name__}) is not n(x) * weight + bias: LayerNorm "
                             "tuning supports LayerNorm/RMSNorm-style norms; leave this module out of target_modules")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.state.adapter_ids is None:
            return y
        term = self.bank.module_layout(self.name).row_scale("norm")
        if term is None:
            return y
        if x.dim() < 3:
            raise ValueError(f"{self.name}: expected [B, L, ..., d] activations, got {tuple(x.shape)}")
        routing = self.state.routing_for(x.shape[0], x.shape[1], x.device)
        w = self.bank.buffer(self.name, term.buffer)
        b = self.bank.buffer(self.name, term.shift) if term.shift is not None else None
        reps = y[0, 0].numel() // w.shape[1]  # a per-head norm (Qwen3's q_norm): one d-vector per head
        if reps > 1:
            w, b = w.repeat(1, reps), (b.repeat(1, reps) if b is not None else None)
        T = x.shape[0] * x.shape[1]
        out = ops.routed_scale(self._unit(x).reshape(T, -1), w, term.slot_row, routing, shift=b,
                               base=y.reshape(T, -1))
        return out.view(y.shape)
