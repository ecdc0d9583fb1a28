"""One AdamW over every adapter of a bank: per-adapter learning rate, betas, eps, weight decay and
LoRA+ ratio, per-adapter gradient-norm clipping and NaN/inf skip, in one fused step.

    opt = BankAdamW.of(engine.bank)                  # one per bank
    opt.configure(i, lr=1e-4, lora_plus_ratio=16.0, weight_decay=0.01)
    sum(losses).backward()
    norms = opt.step(max_grad_norm=1.0, skip=~torch.isfinite(losses))   # every adapter at once
    opt.zero_grad()

For every adapter i this is ``clip_grad_norm_(params_i, max_norm)`` then one step of
``torch.optim.AdamW(methods.param_groups(engine, i), betas, eps, weight_decay)`` (B and 1-D
tensors at lr x ratio), to fp32 round-off: the coefficients are computed on the host in float64
as torch's single-tensor AdamW does and rounded to fp32 as its kernels round them; only the
norm's summation order differs. An adapter whose norm is not finite, or that ``skip`` names,
keeps its weights, state and step count. ``step(adapters=[i])`` touches only those adapters'
slices (the client steps one adapter at a time).

State: the step count per adapter (host), exp_avg and exp_avg_sq kept by the bank beside each
trainable buffer, so they move with their adapter when others are added or removed.
Cost per step: one segmented sum of squares over the bank, one host sync for the [A] norms, one
update per buffer (a loop over buffers, never over adapters).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from lora_engine import ops
from lora_engine.engine.methods import buffer_layout, lora_plus_rate, method_of
from lora_engine.kernels.optim import COEFS, make_segments

HYPER = ("lr", "beta1", "beta2", "eps", "weight_decay")


class BankAdamW:
    """The fused AdamW of one ``AdapterBank`` (``BankAdamW.of(bank)``: there is one per bank).

    Hyperparameters are per adapter and per rate group (0: A-like at lr, 1: B and 1-D tensors
    at lr x LoRA+ ratio), in float64 host arrays indexed by adapter id.
    """

    STATE = ("exp_avg", "exp_avg_sq")

    def __init__(self, bank, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.bank = bank
        bank.add_state(self.STATE)
        self.defaults = {"lr": 0.0, "beta1": float(betas[0]), "beta2": float(betas[1]), "eps": float(eps),
                         "weight_decay": float(weight_decay)}
        self.hyper = {k: np.zeros((2, 0)) for k in HYPER}
        self.steps = np.zeros(0, dtype=np.int64)
        self._segs: dict = {}

    @classmethod
    def of(cls, bank) -> "BankAdamW":
        if getattr(bank, "_optimizer", None) is None:
            bank._optimizer = cls(bank)
        return bank._optimizer

    def _grow(self) -> None:
        A, n = self.bank.num_slots, self.steps.size
        if A > n:
            for k in HYPER:
                self.hyper[k] = np.concatenate([self.hyper[k], np.full((2, A - n), self.defaults[k])], 1)
            self.steps = np.concatenate([self.steps, np.zeros(A - n, dtype=np.int64)])

    def configure(self, i: int, lr: float, lora_plus_ratio: float = 1.0, betas=None, eps=None, weight_decay=None):
        """Adapter ``i``'s AdamW: A-like tensors at ``lr``, B and 1-D tensors at ``lr * lora_plus_ratio``."""
        self._grow()
        self.set(i, 0, lr=lr)
        self.set(i, 1, lr=lr * lora_plus_ratio)
        for group in (0, 1):
            self.set(i, group, betas=betas, eps=eps, weight_decay=weight_decay)

    def configure_from_spec(self, i: int, spec) -> None:
        """``spec.lr``, ``spec.lora_plus_ratio``, ``spec.weight_decay`` (the trainer's per-adapter settings)."""
        self.configure(i, spec.lr, spec.lora_plus_ratio, weight_decay=spec.weight_decay)

    def set(self, i: int, group: int, lr=None, betas=None, eps=None, weight_decay=None) -> None:
        self._grow()
        for key, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if value is not None:
                self.hyper[key][group, i] = float(value)
        if betas is not None:
            self.hyper["beta1"][group, i], self.hyper["beta2"][group, i] = float(betas[0]), float(betas[1])

    def group(self, i: int, group: int) -> dict:
        h = {k: float(self.hyper[k][group, i]) for k in HYPER}
        return {"lr": h["lr"], "betas": (h["beta1"], h["beta2"]), "eps": h["eps"], "weight_decay": h["weight_decay"]}

    # -- the step ------------------------------------------------------------------------
    def _selection(self, ids):
        """Per trainable buffer: (param, grad, exp_avg, exp_avg_sq, Segments, group, write-back), the
        tensors cut down to adapters ``ids`` (None: all; one adapter: views, several: gathers)."""
        out = []
        for name, b, p, slots, fast in self.bank.trainable_buffers():
            m, v = self.bank.state(name, b, "exp_avg"), self.bank.state(name, b, "exp_avg_sq")
            full = (p.detach(), p.grad, m, v)
            if ids is None:
                seg = self._segs.get((name, b))
                if seg is None or seg[0] is not slots:
                    seg = (slots, make_segments(slots.axis, slots.offsets, slots.sizes, slots.ids, p.device))
                    self._segs[(name, b)] = seg
                out.append((*full, seg[1], int(fast), None))
                continue
            sub = [i for i in ids if i in slots.index]
            if not sub:
                continue
            sizes = [slots.span(i)[1] for i in sub]
            offs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
            seg = make_segments(slots.axis, offs, sizes, sub, p.device)
            if len(sub) == 1:
                off, size = slots.span(sub[0])
                parts = tuple(None if t is None else t.narrow(slots.axis, off, size) for t in full)
                out.append((*parts, seg, int(fast), None))
            else:
                idx = slots.positions(sub)
                parts = tuple(None if t is None else t.index_select(slots.axis, idx) for t in full)
                out.append((*parts, seg, int(fast), (slots.axis, idx, full)))
        return out

    @torch.no_grad()
    def step(self, adapters=None, max_grad_norm: float | None = None, skip=None, extra_sumsq=None) -> torch.Tensor:
        """One AdamW step of ``adapters`` (None: every adapter), each clipped to ``max_grad_norm``
        (None: no clipping) over its own gradients. ``skip``: bool [num_slots] (or ids) of
        adapters not to step, e.g. those whose loss was not finite. ``extra_sumsq``: [num_slots]
        squared gradient norms of an adapter's tensors outside the bank (a critic's value head):
        they join its clipping norm, as one ``clip_grad_norm_`` over both would; the caller scales
        those tensors by the same factor (``clip_factors``).

        Returns fp32 [num_slots] on the host: each stepped or skipped adapter's gradient norm
        before clipping (inf/nan: skipped for that), nan for adapters not asked for.
        """
        self._grow()
        A = self.bank.num_slots
        present = self.bank.ids()
        ids = present if adapters is None else sorted(set(int(i) for i in adapters))
        unknown = sorted(set(ids) - set(present))
        if unknown:
            raise ValueError(f"adapters {unknown} are not in the bank (present: {present}): step existing ids")
        picked = self._selection(None if ids == present else ids)
        params, grads, ms, vs, segs, groups, back = (list(col) for col in zip(*picked)) if picked else ([],) * 7
        sumsq = ops.segment_sumsq(grads, segs, A) if picked else torch.zeros(A)
        if extra_sumsq is not None:
            sumsq = sumsq + torch.as_tensor(extra_sumsq, dtype=sumsq.dtype).to(sumsq.device)
        norms = sumsq.sqrt().cpu().numpy()
        asked = np.zeros(A, dtype=bool)
        asked[ids] = True
        ok = asked & np.isfinite(norms)
        if skip is not None:
            skip = torch.as_tensor(skip)
            flags = np.zeros(A, dtype=bool)
            if skip.dtype == torch.bool:
                flags[: skip.numel()] = skip.cpu().numpy()
            else:
                flags[skip.cpu().long().numpy()] = True
            ok &= ~flags
        self.steps[ok] += 1
        if picked:
            coef = torch.from_numpy(self._coefficients(ok, norms, max_grad_norm)).to(params[0].device)
            ops.adamw_update(params, grads, ms, vs, segs, groups, coef)
            for p, m, v, wb in zip(params, ms, vs, back):
                if wb is not None:
                    axis, idx, full = wb
                    for dst, src in zip((full[0], full[2], full[3]), (p, m, v)):
                        dst.index_copy_(axis, idx, src)
        out = norms.astype(np.float32)
        out[~asked] = np.nan
        return torch.from_numpy(out)

    @staticmethod
    def clip_factors(norms, max_grad_norm: float | None) -> np.ndarray:
        """fp32 [n] clip multipliers of ``step``'s norms, torch's ``clip_grad_norm_`` rounding:
        ``min(reciprocal(norm + 1e-6) * max_norm, 1)`` (1 without clipping)."""
        max_norm = np.float32(math.inf if max_grad_norm is None else max_grad_norm)
        recip = np.float32(1.0) / (np.asarray(norms, dtype=np.float32) + np.float32(1e-6))
        with np.errstate(over="ignore", invalid="ignore"):
            return np.minimum(recip * max_norm, np.float32(1.0))

    def _coefficients(self, ok, norms, max_grad_norm) -> np.ndarray:
        """``kernels.optim.COEFS`` [9, 2, A] fp32 for this step, as torch computes each scalar:
        the bias corrections in float64 (Python floats), the clip factor in fp32 tensor math
        (``max_norm / (norm + 1e-6)`` is ``reciprocal(norm + 1e-6) * max_norm``, then ``min 1``)."""
        h = self.hyper
        step = np.where(ok, self.steps, 1).astype(np.float64)[None, :]
        bc1 = 1.0 - h["beta1"] ** step
        bc2 = 1.0 - h["beta2"] ** step
        clip = self.clip_factors(norms, max_grad_norm)
        table = {"active": np.broadcast_to(ok, h["lr"].shape).astype(np.float64),
                 "clip": np.broadcast_to(clip, h["lr"].shape), "decay": 1.0 - h["lr"] * h["weight_decay"],
                 "w1": 1.0 - h["beta1"], "beta2": h["beta2"], "w2": 1.0 - h["beta2"], "neg_step": -(h["lr"] / bc1),
                 "bc2_sqrt": bc2 ** 0.5, "eps": h["eps"]}
        return np.stack([np.asarray(table[k], dtype=np.float32) for k in COEFS])

    def zero_grad(self, adapters=None) -> None:
        """Clear the gradients of ``adapters`` (None: every buffer's gradient is dropped)."""
        self.bank.zero_grad_of(None if adapters is None else list(adapters))

    # -- per adapter -------------------------------------------------------------------------
    def ordered_views(self, i: int) -> list:
        """Adapter ``i``'s trainable views in torch-state order: A-like first, then B-like
        (the order of ``methods.param_groups``, so old torch AdamW checkpoints load)."""
        method = method_of(self.bank.specs[i])
        views = [v for v in self.bank.named_parameters_of(i).values() if v.requires_grad]
        fast = [lora_plus_rate(v._key[2], method.layout_of(v._key[2])) for v in views]
        return [v for v, f in zip(views, fast) if not f] + [v for v, f in zip(views, fast) if f]

    def _state_of(self, view, s: str) -> torch.Tensor:
        _, module, _, b = view._key
        return self.bank.state(module, b, s)[view._index]

    def state_dict_of(self, i: int) -> dict:
        """Adapter ``i``'s state in ``torch.optim.AdamW.state_dict()``'s format (copies)."""
        self._grow()
        views = self.ordered_views(i)
        state = {}
        if self.steps[i] > 0:
            state = {j: {"step": torch.tensor(float(self.steps[i])),
                         **{s: self._state_of(v, s).detach().clone() for s in self.STATE}} for j, v in enumerate(views)}
        n_slow = sum(not lora_plus_rate(v._key[2], buffer_layout(v._key[3])) for v in views)
        groups = [{**self.group(i, 0), "params": list(range(n_slow))},
                  {**self.group(i, 1), "params": list(range(n_slow, len(views)))}]
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict_of(self, i: int, sd: dict) -> None:
        """Load ``state_dict_of``'s (or a torch AdamW's over ``methods.param_groups``) into adapter ``i``."""
        self._grow()
        views, groups = self.ordered_views(i), sd["param_groups"]
        if sum(len(g["params"]) for g in groups) != len(views) or len(groups) != 2:
            raise ValueError(f"optimizer state has {sum(len(g['params']) for g in groups)} tensors in "
                             f"{len(groups)} groups but adapter {i} has {len(views)} in 2: was it saved from another "
                             "adapter or method?")
        state = {int(k): v for k, v in sd["state"].items()}
        step = 0
        for j, v in enumerate(views):
            st = state.get(j)
            for s in self.STATE:
                self._state_of(v, s).copy_(st[s] if st is not None else torch.zeros(()))
            if st is not None:
                step = int(float(st["step"]))
        self.steps[i] = step
        for g, group in enumerate(groups):
            self.set(i, g, lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"])

    def adapter(self, i: int) -> "AdapterOptimizer":
        return AdapterOptimizer(self, i)


class _Group(dict):
    """One rate group of one adapter, as ``torch.optim`` shows it; writes go to the bank optimizer."""

    def __init__(self, owner: "AdapterOptimizer", group: int):
        super().__init__(owner.bank_optimizer.group(owner.adapter, group))
        self._owner, self._group = owner, group

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if key in ("lr", "betas", "eps", "weight_decay"):
            self._owner.bank_optimizer.set(self._owner.adapter, self._group, **{key: value})

    def update(self, *args, **kwargs):
        for k, v in dict(*args, **kwargs).items():
            self[k] = v


class AdapterOptimizer:
    """Adapter ``i``'s share of a ``BankAdamW`` with the surface of a ``torch.optim`` optimiser:
    ``param_groups`` (two: lr and lr x LoRA+ ratio; writing a group's lr/betas/eps/weight_decay
    sets them for this adapter), ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``."""

    def __init__(self, bank_optimizer: BankAdamW, i: int):
        self.bank_optimizer, self.adapter = bank_optimizer, i

    @property
    def param_groups(self) -> list[_Group]:
        return [_Group(self, 0), _Group(self, 1)]

    def step(self, max_grad_norm: float | None = None) -> tuple[float, bool]:
        """Clip this adapter's gradients to ``max_grad_norm`` and step it alone (the fused step on
        its slices). Returns (gradient norm before clipping, skipped: the norm was not finite)."""
        norm = float(self.bank_optimizer.step([self.adapter], max_grad_norm)[self.adapter])
        return norm, not math.isfinite(norm)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.bank_optimizer.zero_grad([self.adapter])

    def state_dict(self) -> dict:
        return self.bank_optimizer.state_dict_of(self.adapter)

    def load_state_dict(self, sd: dict) -> None:
        self.bank_optimizer.load_state_dict_of(self.adapter, sd)
