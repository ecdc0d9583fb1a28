"""``AdapterBank``: every adapter's weights, packed per targeted module, with stable integer ids.

Per module, every adapter's tensors of one kind live in one leaf ``nn.Parameter`` laid out by
``methods.LAYOUTS`` (A_all [sum r, K], B_all [N, sum r], DoRA's m [n, N], ...), so the LoRA
kernel reads the leaves as they are (no copy per forward for the LoRA family) and one fused
optimiser step covers the bank (``engine.optimizer``). Adding or removing adapters lays out the
buffers of the modules they touch again, once (``deferred()`` lays a whole list out once);
weights, gradients and optimiser state move with their adapters, whose ids never change.
Per-adapter tensors (``tensors``, ``named_parameters_of``) are ``AdapterView``s of the buffers.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from lora_engine.engine import methods
from lora_engine.engine.methods import LAYOUTS, RANKED, method_of, storage_name
from lora_engine.engine.packing import (AdapterView, ModuleLayout, build_layout, check_new_adapter, extend_layout,
                                        restack, view_index)
from lora_engine.engine.spec import AdapterSpec, layer_index, matches
from lora_engine.kernels.lora import LoRALayout


def _key(module_name: str) -> str:
    # Module keys may not contain dots.
    return module_name.replace(".", "__")


class _ModuleInfo:
    def __init__(self, in_features: int, out_features: int, device, weight: torch.Tensor | None = None):
        self.in_features, self.out_features, self.device, self.weight = in_features, out_features, device, weight
        self.w_sq: tuple | None = None  # ((device, dtype, data_ptr) of W, ||W_n||^2)


class AdapterBank(nn.Module):
    """Every adapter's weights, packed per targeted module, with stable integer ids.

    ``store[<module key>]`` holds one parameter per buffer: ``lora_A`` [sum r, K], ``lora_B``
    [N, sum r], and per method its other kinds (``methods.TABLE``); frozen kinds (LoRA-FA's A,
    PiSSA's A0/B0) sit in ``<kind>__frozen`` buffers with requires_grad=False, so they never get
    a gradient or optimiser state but checkpoints save them. Removed ids stay unused (rank 0
    everywhere), so the other adapters' ids never change.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.store = nn.ModuleDict()
        self.shared = nn.Module()  # VeRA projections, buffers shared by adapters
        self.specs: dict[int, AdapterSpec] = {}
        self.modules_info: dict[str, _ModuleInfo] = {}
        self.default_targets = "all-linear"
        self.dtype = dtype
        self.next_id = 0
        self._targets: dict[int, list[str]] = {}
        self._on: dict[str, set[int]] = {}          # module -> ids adapting it
        self._vera: dict[int, str] = {}
        self._layouts: dict[str, ModuleLayout] = {}
        self._epoch = 0                             # layouts built so far (memo keys: fresh buffers restart versions)
        self._laid_slots = -1                       # num_slots the layouts were built for
        self._pending: dict[int, dict] = {}         # new adapters' init tensors until they are laid out
        self._dirty: set[str] = set()               # modules whose buffers must be laid out again
        self._defer = 0
        self.state_names: tuple[str, ...] = ()      # optimiser state kept beside each trainable buffer
        self._views: dict = {}
        self._cleared: dict = {}                    # view key -> buffer generation when its grad was cleared
        self._gen: dict = {}                        # (module, buffer) -> backward accumulations seen

    def __getstate__(self):
        # Views and gradient bookkeeping belong to this instance's buffers (a deepcopy builds its own).
        state = dict(self.__dict__)
        state.update(_views={}, _cleared={}, _gen={})
        return state

    def _apply(self, fn, recurse=True):
        # A move or cast (.to, .cuda, .double): the layouts' index tensors follow the buffers.
        out = super()._apply(fn, recurse)
        for name, info in self.modules_info.items():
            params = list(self.store[_key(name)]._parameters.values())
            info.device = info.weight.device if info.weight is not None else (
                params[0].device if params else info.device)
        self._layouts, self._laid_slots, self._views = {}, -1, {}
        return out

    # -- registry ------------------------------------------------------------------------
    def register_module_info(self, name: str, in_features: int, out_features: int, device,
                             weight: torch.Tensor | None = None) -> None:
        """``weight`` ([N, K], frozen) is needed by the methods that read W: DoRA, PiSSA, MiLoRA."""
        self.modules_info[name] = _ModuleInfo(in_features, out_features, torch.device(device), weight)
        self.store[_key(name)] = nn.Module()
        self._on[name] = set()
        self._laid_slots = -1

    def targets_of(self, spec: AdapterSpec) -> list[str]:
        targets = spec.target_modules if spec.target_modules is not None else self.default_targets
        names = [n for n in self.modules_info if matches(n, targets)]
        if spec.layers is not None:
            names = [n for n in names if layer_index(n) in spec.layers]
        return names

    def modules_of(self, i: int) -> list[str]:
        """The modules adapter ``i`` adapts, sorted."""
        self._check_id(i)
        return list(self._targets[i])

    @property
    def num_slots(self) -> int:
        """Ids in [0, num_slots) are valid routing targets if present (removed ones are not)."""
        return self.next_id

    def ids(self) -> list[int]:
        return sorted(self.specs)

    def _check_id(self, i: int) -> None:
        if i not in self.specs:
            raise ValueError(f"no adapter with id {i}; present: {self.ids()}")

    # -- add / remove --------------------------------------------------------------------
    @contextlib.contextmanager
    def deferred(self):
        """Adds and removes inside the block are laid out once, at its end (1,024 adds: one copy)."""
        self._defer += 1
        try:
            yield self
        finally:
            self._defer -= 1
            if not self._defer:
                self._ensure()

    def add(self, spec: AdapterSpec) -> int:
        names = sorted(self.targets_of(spec))
        check_new_adapter(spec, names, self.modules_info)
        method = method_of(spec)
        i = self.next_id
        vera = self._vera_projection(spec, names) if method.shared_projection else None
        # Seeded by the spec alone, drawn module after module in sorted order: an adapter's init
        # never depends on the other adapters.
        gen = torch.Generator().manual_seed(spec.seed)
        init = {}
        for n in names:
            info = self.modules_info[n]
            tensors = method.init(spec, n, info.in_features, info.out_features, info.weight, gen)
            init[n] = {kind: t.to(info.device, self.dtype) for kind, t in tensors.items()}
        self._pending[i] = init
        self.specs[i], self._targets[i] = spec, names
        for n in names:
            self._on[n].add(i)
        if vera is not None:
            self._vera[i] = vera
        self.next_id += 1
        self._dirty.update(names)
        if not self._defer:
            self._ensure()
        return i

    def _vera_projection(self, spec: AdapterSpec, names: list[str]) -> str:
        # As PEFT: one projection pair sized to the largest targeted module, sliced per module.
        n_max = max(self.modules_info[n].out_features for n in names)
        k_max = max(self.modules_info[n].in_features for n in names)
        name = f"vera_r{spec.rank}_key{spec.projection_prng_key}_{n_max}x{k_max}"
        if not hasattr(self.shared, name + "_A"):
            a, b = methods.vera_projections(spec.rank, spec.projection_prng_key, n_max, k_max)
            dev = self.modules_info[names[0]].device
            self.shared.register_buffer(name + "_A", a.to(dev, self.dtype), persistent=False)
            self.shared.register_buffer(name + "_B", b.to(dev, self.dtype), persistent=False)
        return name

    def remove(self, i: int) -> None:
        self._check_id(i)
        names = self._targets.pop(i)
        del self.specs[i]
        self._pending.pop(i, None)
        for n in names:
            self._on[n].discard(i)
        self._vera.pop(i, None)
        self._cleared = {k: v for k, v in self._cleared.items() if k[0] != i}
        self._dirty.update(names)
        if not self._defer:
            self._ensure()

    # -- layout --------------------------------------------------------------------------
    def _ensure(self) -> None:
        if self._dirty or self._laid_slots != self.next_id:
            self._relayout()

    def _relayout(self) -> None:
        """Lay out the buffers of the modules adapters were added to or removed from (weights,
        gradients and optimiser state move with their adapters; new ones start from their init
        and zero state), and rebuild every module's layout for the current slots."""
        for name, info in self.modules_info.items():
            if name not in self._dirty and name in self._layouts:
                self._layouts[name] = extend_layout(self._layouts[name], self.next_id)
                continue
            specs = {i: self.specs[i] for i in self._on[name]}
            new = build_layout(name, info.in_features, info.out_features, info.device, specs, self.next_id,
                               self.vera_of)
            if name in self._dirty:
                pending = {i: t[name] for i, t in self._pending.items() if name in t}
                restack(self.store[_key(name)], self._layouts.get(name), new, pending, self.state_names,
                        self.dtype, info.device)
                self._views = {k: v for k, v in self._views.items() if k[1] != name}
                self._rewatch(name)
            self._layouts[name] = new
        self._pending = {}
        self._dirty = set()
        self._laid_slots = self.next_id
        self._epoch += 1

    def module_layout(self, name: str) -> ModuleLayout:
        """What module ``name`` computes for the current adapters (see ``packing.ModuleLayout``)."""
        self._ensure()
        return self._layouts[name]

    def layout(self, name: str) -> LoRALayout:
        """Ranks/scales of all slots on module ``name`` (rank 0 where an adapter is absent)."""
        return self.module_layout(name).kernel

    def buffer(self, name: str, b: str) -> nn.Parameter:
        """Module ``name``'s buffer ``b`` (``lora_A``, ``lora_B``, ``lora_A__frozen``, ...)."""
        self._ensure()
        return self.store[_key(name)]._parameters[b]

    def trainable_buffers(self):
        """Yield (module, buffer name, parameter, Slots, LoRA+ rate?) of every trainable buffer."""
        self._ensure()
        for name, lay in self._layouts.items():
            store = self.store[_key(name)]
            for b, slots in lay.slots.items():
                if not b.endswith("__frozen"):
                    yield name, b, store._parameters[b], slots, methods.lora_plus_rate(b, methods.buffer_layout(b))

    def add_state(self, names) -> None:
        """Keep optimiser state ``names`` (zeros at first) beside every trainable buffer, laid out with it."""
        new = tuple(n for n in names if n not in self.state_names)
        self.state_names += new
        for name, b, p, _, _ in self.trainable_buffers():
            for s in new:
                self.store[_key(name)].register_buffer(f"{b}__{s}", torch.zeros_like(p.detach()), persistent=False)

    def state(self, name: str, b: str, s: str) -> torch.Tensor:
        return self.store[_key(name)]._buffers[f"{b}__{s}"]

    # -- per-adapter views -----------------------------------------------------------------
    def tensors(self, i: int, name: str) -> dict[str, AdapterView]:
        """{kind: view} of adapter ``i`` on module ``name`` (views of the module's buffers)."""
        self._ensure()
        self._check_id(i)
        store = self.store[_key(name)]
        views = self._views.get((i, name))
        # Stale after a cast or move of the bank (.to, .double: new data in the same parameter).
        if views is None or any(v._buffer is not store._parameters[v._key[3]] or v._buffer.data_ptr() != v._ptr
                                for v in views.values()):
            views = self._make_views(i, name)
            self._views[(i, name)] = views
        return views

    def _make_views(self, i: int, name: str) -> dict[str, AdapterView]:
        method, lay, store = method_of(self.specs[i]), self._layouts[name], self.store[_key(name)]
        views = {}
        for kind, layout in method.kinds:
            b = storage_name(method, kind)
            off, size = lay.slots[b].span(i)
            buf = store._parameters[b]
            v = AdapterView(buf, view_index(LAYOUTS[layout], layout in RANKED, off, size), method.is_trainable(kind),
                            self, (i, name, kind, b))
            v._ptr = buf.data_ptr()
            views[kind] = v
        return views

    def named_parameters_of(self, i: int) -> dict[str, AdapterView]:
        """{"<module>.<kind>": view} for adapter i, frozen ones included (checkpoints save them).

        Kinds per method in its ``methods.TABLE`` record; plain LoRA gives "<module>.lora_A" and "<module>.lora_B".
        """
        self._check_id(i)
        per_module = {n: self.tensors(i, n) for n in self._targets[i]}
        return {f"{n}.{kind}": per_module[n][kind] for kind in method_of(self.specs[i]).kind_names
                for n in self._targets[i]}

    def parameters_of(self, i: int) -> list[AdapterView]:
        """Adapter ``i``'s trainable tensors (frozen ones, e.g. LoRA-FA's A, are left out)."""
        return [p for p in self.named_parameters_of(i).values() if p.requires_grad]

    def vera_of(self, i: int):
        """(A_v [r, K_max], B_v [N_max, r]) shared projections of VeRA adapter ``i``, else None."""
        name = self._vera.get(i)
        return None if name is None else (getattr(self.shared, name + "_A"), getattr(self.shared, name + "_B"))

    def full_delta(self, i: int, name: str) -> AdapterView:
        """Dense dW [N, K] of the full fine-tuning adapter ``i`` on module ``name``."""
        return self.tensors(i, name)["delta_weight"]

    # -- gradients -------------------------------------------------------------------------
    def _is_cleared(self, key) -> bool:
        return key in self._cleared and self._cleared[key] == self._gen.get((key[1], key[3]), 0)

    def _watch(self, buffer: nn.Parameter, where) -> None:
        # Counts the buffer's gradient accumulations: a cleared view reads None until the next one.
        if getattr(buffer, "_le_bank", None) is not self:
            def bump(_, ref=weakref.ref(self), where=where) -> None:
                if ref() is not None:
                    ref()._gen[where] = ref()._gen.get(where, 0) + 1
            buffer.register_post_accumulate_grad_hook(bump)
            buffer._le_bank = self

    def _clear_grad(self, key, buffer: nn.Parameter, index) -> None:
        self._watch(buffer, (key[1], key[3]))
        if buffer.grad is not None:
            buffer.grad[index].zero_()
        self._cleared[key] = self._gen.get((key[1], key[3]), 0)

    def _rewatch(self, name: str) -> None:
        # Module name's buffers were laid out anew: views cleared on the old ones stay cleared.
        cleared = [k for k in self._cleared if k[1] == name and self._is_cleared(k)]
        self._cleared = {k: v for k, v in self._cleared.items() if k[1] != name}
        self._gen = {w: g for w, g in self._gen.items() if w[0] != name}
        store = self.store[_key(name)]
        for k in cleared:
            self._watch(store._parameters[k[3]], (name, k[3]))
            self._cleared[k] = 0

    def has_grad(self, i: int) -> bool:
        return any(p.grad is not None for p in self.parameters_of(i))

    def zero_grad_of(self, ids=None) -> None:
        """Clear the gradients of adapters ``ids`` (None: all, by dropping every buffer's gradient)."""
        if ids is None:
            for _, _, p, _, _ in self.trainable_buffers():
                p.grad = None
            self._cleared = {}
            return
        for i in ids:
            for p in self.parameters_of(i):
                p.grad = None

    # -- what a forward reads ---------------------------------------------------------------
    def _versions(self, name: str) -> tuple:
        # Tensor version counters: an in-place update (optimiser step, copy_ into a view) changes them.
        return (self._epoch,) + tuple(p._version for p in self.store[_key(name)]._parameters.values())

    def kernel_pair(self, name: str, dtype: torch.dtype, memo: dict | None = None):
        """(A_all [sum R', K], B_all [N, sum R']) in slot order, cast to ``dtype`` (differentiable).

        The LoRA family's are the ``lora_A`` / ``lora_B`` buffers themselves; other methods' come
        from their records' ``pack`` over all their adapters at once (one call per method group,
        then one gather into slot order). ``memo``: a dict valid while the weights cannot change
        (a no-grad routing context): generation builds each module's pair once, not once per token.
        """
        lay = self.module_layout(name)
        if memo is not None:
            key = ("pair", name, dtype, self._versions(name))
            if key not in memo:
                memo[key] = self.kernel_pair(name, dtype)
            return memo[key]
        info, store = self.modules_info[name], self.store[_key(name)]
        if not lay.groups:
            return (torch.zeros(0, info.in_features, device=info.device, dtype=dtype),
                    torch.zeros(info.out_features, 0, device=info.device, dtype=dtype))
        parts_a, parts_b = [], []
        for g in lay.groups:
            m = methods.TABLE[g.method]
            t = {}
            for kind in m.kernel_kinds:
                buf, sel = store._parameters[storage_name(m, kind)], g.select[kind]
                t[kind] = buf if sel is None else buf.index_select(LAYOUTS[m.layout_of(kind)], sel)
            pa, pb = m.pack(t, g.context)
            parts_a += pa
            parts_b += pb
        if lay.perm is None:
            return parts_a[0].to(dtype), parts_b[0].to(dtype)
        return (torch.cat(parts_a, 0).index_select(0, lay.perm).to(dtype),
                torch.cat(parts_b, 1).index_select(1, lay.perm).to(dtype))

    def dora_scale(self, name: str, weight: torch.Tensor, memo: dict | None = None) -> torch.Tensor:
        """[num_slots, N] fp32: m_a / ||W + s_a B_a A_a||_c on the rows of the module's DoRA adapters, 1 elsewhere.

        Differentiable in m only (the norm is detached, as PEFT). All DoRA adapters at once
        (``methods.dora_norms``, one batch per distinct rank). ``memo``: as for ``kernel_pair``.
        """
        lay = self.module_layout(name)
        d, info, store = lay.dora, self.modules_info[name], self.store[_key(name)]
        if memo is not None:
            key = ("dora", name, self._versions(name))
            if key not in memo:
                memo[key] = self.dora_scale(name, weight)
            return memo[key]
        if info.w_sq is None or info.w_sq[0] != (weight.device, weight.dtype, weight.data_ptr()):
            # W is frozen; only a move or cast of the base model (.to/.cuda) changes it.
            info.w_sq = ((weight.device, weight.dtype, weight.data_ptr()), methods.column_norm_sq(weight))
        a, b = store._parameters["lora_A"], store._parameters["lora_B"]
        a = a if d.a_rows is None else a.index_select(0, d.a_rows)
        b = b if d.b_cols is None else b.index_select(1, d.b_cols)
        norms = methods.dora_norms(weight, a, b, d.scales, d.buckets, info.w_sq[1])
        m = store._parameters["lora_magnitude_vector"]
        m = m if d.m_rows is None else m.index_select(0, d.m_rows)
        rows = m.float() / norms
        ones = torch.ones(self.next_id, info.out_features, device=weight.device, dtype=rows.dtype)
        return ones.index_copy(0, d.slots, rows)
