"""The bank's packed storage, one module at a time.

``Slots``: where each adapter sits along one buffer's adapter axis. ``ModuleLayout``: what a
module computes for its adapters, derived once per add/remove (the kernel's ``LoRALayout``, the
method groups whose ``pack`` builds the kernel pair, DoRA's and full fine-tuning's extra terms),
so a forward does no per-adapter work. ``AdapterView``: one adapter's tensor of one kind, a view
of its module's buffer, for everything that wants per-adapter tensors (PEFT export, spectrum,
the client, torch optimisers in tests).

All index tensors live on the module's device, built here once; a forward never sends an index
from the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lora_engine.engine.methods import LAYOUTS, RANKED, PackGroup, buffer_layout, method_of, storage_name
from lora_engine.engine.spec import pattern_key
from lora_engine.kernels.lora import LoRALayout


@dataclass(eq=False)
class Slots:
    """Adapters ``ids`` (ascending) along a buffer's adapter axis ``axis``, ``sizes[j]`` positions each
    (the rank for rows/cols/rank layouts, 1 for out/dense)."""

    ids: tuple[int, ...]
    sizes: tuple[int, ...]
    axis: int
    device: torch.device
    offsets: tuple[int, ...] = field(init=False)
    index: dict[int, int] = field(init=False)
    owner: torch.Tensor = field(init=False)  # [total] int64: the adapter id of each position

    def __post_init__(self):
        offs, o = [], 0
        for s in self.sizes:
            offs.append(o)
            o += s
        self.offsets = tuple(offs)
        self.index = {i: j for j, i in enumerate(self.ids)}
        self.owner = torch.repeat_interleave(torch.tensor(self.ids, dtype=torch.int64),
                                             torch.tensor(self.sizes, dtype=torch.int64)).to(self.device)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def span(self, i: int) -> tuple[int, int]:
        j = self.index[i]
        return self.offsets[j], self.sizes[j]

    def positions(self, ids) -> torch.Tensor | None:
        """Positions of ``ids`` along the axis (int64, device), or None when they are all of them."""
        ids = list(ids)
        if tuple(ids) == self.ids:
            return None
        pos = [torch.arange(self.offsets[j], self.offsets[j] + self.sizes[j]) for j in map(self.index.get, ids)]
        return (torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64)).to(self.device)


@dataclass(eq=False)
class KernelGroup:
    """Kernel adapters of one ``pack`` (the LoRA family shares one): ``method`` names a record of
    the group (looked up at forward time), ``select[kind]`` its positions in that kind's buffer."""

    method: str
    ids: tuple[int, ...]
    select: dict[str, torch.Tensor | None]
    context: PackGroup


@dataclass(eq=False)
class DoraTerms:
    """DoRA adapters of a module: slot flags for the epilogue, their rows in lora_A / lora_B / m."""

    flags: tuple[bool, ...]            # [num_slots]
    slots: torch.Tensor                # [n] their adapter ids
    a_rows: torch.Tensor | None        # positions in the lora_A rows (None: all)
    b_cols: torch.Tensor | None        # positions in the lora_B columns (LoRA-FA adapters have a B, not an A)
    m_rows: torch.Tensor | None        # positions in the magnitude buffer (None: all)
    scales: torch.Tensor               # [n] fp32 s of each
    buckets: tuple                     # ((idx [n_r * r], which [n_r]), ...) one per distinct rank


@dataclass(eq=False)
class ModuleLayout:
    ids: tuple[int, ...]                          # adapters on this module (ascending)
    kernel: LoRALayout                            # ranks/scales of all slots (0 where absent)
    slots: dict[str, Slots]                       # buffer name -> where each adapter sits
    shapes: dict[str, tuple]                      # buffer name -> shape
    groups: tuple[KernelGroup, ...]
    perm: torch.Tensor | None                     # kernel rows of the concatenated parts (None: as they are)
    dora: DoraTerms | None
    full: torch.Tensor | None                     # [num_slots] int64: dW row of each full fine-tuning slot, -1 else
    full_ids: tuple[int, ...] = ()


def _buffer_shape(layout: str, total: int, K: int, N: int) -> tuple:
    return {"rows": (total, K), "cols": (N, total), "rank": (total,), "out": (total, N), "dense": (total, N, K)}[layout]


def build_layout(name: str, K: int, N: int, device, specs: dict, num_slots: int, vera_of) -> ModuleLayout:
    """The layout of module ``name`` for ``specs`` {id: AdapterSpec} (the adapters targeting it)."""
    ids = tuple(sorted(specs))
    per_buffer: dict[str, tuple[str, list, list]] = {}
    for i in ids:
        method = method_of(specs[i])
        r = specs[i].rank_for(name)
        for kind, layout in method.kinds:
            buf = per_buffer.setdefault(storage_name(method, kind), (layout, [], []))
            buf[1].append(i)
            buf[2].append(r if layout in RANKED else 1)
    slots = {b: Slots(tuple(i_), tuple(s_), LAYOUTS[lay], device) for b, (lay, i_, s_) in per_buffer.items()}
    shapes = {b: _buffer_shape(lay, slots[b].total, K, N) for b, (lay, _, _) in per_buffer.items()}
    ranks, scales = [0] * num_slots, [0.0] * num_slots
    for i in ids:
        ranks[i] = method_of(specs[i]).kernel_rank(specs[i], name)
        scales[i] = specs[i].scale_for(name)
    groups, perm = _kernel_groups(name, K, N, device, specs, ids, slots, vera_of)
    dora = _dora_terms(name, device, specs, ids, slots, num_slots)
    full_ids = tuple(i for i in ids if method_of(specs[i]).epilogue == "dense")
    full = None
    if full_ids:
        full = torch.full((num_slots,), -1, dtype=torch.int64)
        full[list(full_ids)] = torch.arange(len(full_ids))
        full = full.to(device)
    return ModuleLayout(ids, LoRALayout(ranks, scales), slots, shapes, groups, perm, dora, full, full_ids)


def extend_layout(lay: ModuleLayout, num_slots: int) -> ModuleLayout:
    """``lay`` for more slots (adapters added elsewhere): the new slots are absent here (rank 0).
    O(slots) tuple work and no per-adapter Python, so an add touches only its own modules."""
    k = num_slots - lay.kernel.num_adapters
    if k <= 0:
        return lay
    dora, full = lay.dora, lay.full
    if dora is not None:
        dora = DoraTerms(dora.flags + (False,) * k, dora.slots, dora.a_rows, dora.b_cols, dora.m_rows, dora.scales,
                         dora.buckets)
    if full is not None:
        full = torch.cat([full, full.new_full((k,), -1)])
    kernel = LoRALayout(lay.kernel.ranks + (0,) * k, lay.kernel.scales + (0.0,) * k)
    return ModuleLayout(lay.ids, kernel, lay.slots, lay.shapes, lay.groups, lay.perm, dora, full, lay.full_ids)


def _kernel_groups(name, K, N, device, specs, ids, slots, vera_of):
    """Kernel adapters grouped by (pack, buffers it reads, parts), and the kernel-row permutation
    of the concatenated parts (None when one group of one part already is in slot order)."""
    keyed: dict = {}
    for i in ids:
        m = method_of(specs[i])
        if m.kernel_factor:
            key = (m.pack, tuple(storage_name(m, k) for k in m.kernel_kinds), m.kernel_factor)
            keyed.setdefault(key, []).append(i)
    groups, source, base = [], {}, 0  # source[(i, part)] = first row of adapter i's part in the parts
    for (_, buffers, factor), members in keyed.items():
        m = method_of(specs[members[0]])
        ranks = [specs[i].rank_for(name) for i in members]
        select = {k: slots[b].positions(members) for k, b in zip(m.kernel_kinds, buffers)}
        owner = torch.repeat_interleave(torch.arange(len(members)), torch.tensor(ranks)).to(device)
        vera = None
        if m.shared_projection:
            pairs = [vera_of(i) for i in members]
            vera = (torch.cat([a[:, :K] for a, _ in pairs], 0), torch.cat([b[:N] for _, b in pairs], 1))
        groups.append(KernelGroup(m.name, tuple(members), select, PackGroup(K, N, owner, vera)))
        total = sum(ranks)
        for p in range(factor):
            off = base + p * total
            for i, r in zip(members, ranks):
                source[(i, p)] = off
                off += r
        base += factor * total
    if len(groups) <= 1 and all(method_of(specs[i]).kernel_factor <= 1 for i in ids):
        return tuple(groups), None
    rows = []
    for i in ids:  # kernel order: slot by slot, each slot's parts in turn
        m = method_of(specs[i])
        r = specs[i].rank_for(name)
        for p in range(m.kernel_factor):
            rows.extend(range(source[(i, p)], source[(i, p)] + r))
    return tuple(groups), torch.tensor(rows, dtype=torch.int64, device=device)


def _dora_terms(name, device, specs, ids, slots, num_slots):
    dora = [i for i in ids if method_of(specs[i]).epilogue == "column_scale"]
    if not dora:
        return None
    flags = [False] * num_slots
    for i in dora:
        flags[i] = True
    ranks = [specs[i].rank_for(name) for i in dora]
    offs = [sum(ranks[:j]) for j in range(len(dora))]
    buckets = []
    for r in sorted(set(ranks)):
        which = [j for j, rj in enumerate(ranks) if rj == r]
        idx = [offs[j] + k for j in which for k in range(r)]
        buckets.append((torch.tensor(idx, device=device), torch.tensor(which, device=device)))
    m = method_of(specs[dora[0]])
    return DoraTerms(tuple(flags), torch.tensor(dora, device=device),
                     slots[storage_name(m, "lora_A")].positions(dora), slots[storage_name(m, "lora_B")].positions(dora),
                     slots[storage_name(m, "lora_magnitude_vector")].positions(dora),
                     torch.tensor([specs[i].scale_for(name) for i in dora], dtype=torch.float32, device=device),
                     tuple(buckets))


def restack(store: nn.Module, old: ModuleLayout | None, new: ModuleLayout, pending: dict, state_names, dtype,
            device) -> None:
    """Lay ``store``'s buffers out for ``new``: each kept adapter's slice of the weights, gradient
    and optimiser state (``state_names``) moves from its place under ``old``; a new adapter
    (``pending`` {id: {kind: init tensor}}) starts from its init, zero gradient and zero state.
    One ``torch.cat`` per buffer; buffers no adapter uses any more are dropped."""
    for b in [b for b in store._parameters if b not in new.slots]:
        del store._parameters[b]
        for s in state_names:
            store._buffers.pop(f"{b}__{s}", None)
    for b, slots in new.slots.items():
        kind, trainable = b.removesuffix("__frozen"), not b.endswith("__frozen")
        old_p = store._parameters.get(b)
        old_slots = old.slots.get(b) if old is not None else None

        def stack(old_t, fresh):
            # Kept adapters that sat next to each other move as one block (an add is one copy).
            pieces, run = [], None  # run: [offset, size] of the current block of old positions
            for i in slots.ids:
                if old_t is not None and old_slots is not None and i in old_slots.index and i not in pending:
                    off, size = old_slots.span(i)
                    if run is not None and run[0] + run[1] == off:
                        run[1] += size
                        continue
                    if run is not None:
                        pieces.append(old_t.narrow(slots.axis, *run))
                    run = [off, size]
                else:
                    if run is not None:
                        pieces.append(old_t.narrow(slots.axis, *run))
                        run = None
                    pieces.append(fresh(i))
            if run is not None:
                pieces.append(old_t.narrow(slots.axis, *run))
            return torch.cat(pieces, slots.axis)

        def init(i):
            t = pending[i][kind]
            return t if buffer_layout(b) in RANKED else t.unsqueeze(0)

        def zeros(i):
            shape = list(new.shapes[b])
            shape[slots.axis] = slots.sizes[slots.index[i]]
            return torch.zeros(shape, dtype=dtype, device=device)

        with torch.no_grad():
            param = nn.Parameter(stack(None if old_p is None else old_p.detach(), init), requires_grad=trainable)
            if old_p is not None and old_p.grad is not None:
                param.grad = stack(old_p.grad, zeros)
            store.register_parameter(b, param)
            if trainable:
                for s in state_names:
                    prev = store._buffers.get(f"{b}__{s}")
                    store.register_buffer(f"{b}__{s}", stack(prev, zeros), persistent=False)


def check_new_adapter(spec, names: list[str], modules_info: dict) -> None:
    """ValueError naming the fix when ``spec`` cannot go on modules ``names`` (ranks, patterns, W)."""
    if not names:
        raise ValueError(f"adapter targets {spec.target_modules!r} (layers {spec.layers}) match no wrapped "
                         f"module; wrapped: {list(modules_info)[:6]}...: pass names that end one of these")
    for attr in ("rank_pattern", "alpha_pattern"):
        unused = [k for k in getattr(spec, attr) or {} if not any(pattern_key([k], n) for n in names)]
        if unused:
            raise ValueError(f"{attr} key(s) {unused} match none of the adapter's modules (e.g. {names[0]}): "
                             "use a module-name suffix such as 'q_proj' or 'layers.0.mlp.down_proj'")
    method = method_of(spec)
    for n in names:
        info = modules_info[n]
        # PiSSA/MiLoRA's frozen init rides along as a second rank-r pair: 2r rows in the kernel.
        limit = min(info.in_features, info.out_features) // method.rank_divisor
        if method.kernel_factor and spec.rank_for(n) > limit:
            half = f" / {method.rank_divisor}" if method.rank_divisor > 1 else ""
            raise ValueError(f"rank {spec.rank_for(n)} exceeds min(in={info.in_features}, "
                             f"out={info.out_features}){half} of module {n} "
                             f"(method {spec.method}): choose rank <= {limit}")
        if method.needs_weight and info.weight is None:
            raise ValueError(f"method {spec.method!r} needs the base weight of {n}: register modules "
                             "through MultiLoRAModel (or pass weight= to AdapterBank.register_module_info)")


class AdapterView(nn.Parameter):
    """Adapter ``i``'s tensor of one kind on one module: a view of the module's buffer.

    Writes (``copy_``, an optimiser's in-place update) land in the buffer. ``.grad`` is the
    matching slice of the buffer's gradient; setting it to None zeroes that slice and reads as
    None until the buffer accumulates a gradient again (a later backward), as a parameter of its
    own would. Built by ``AdapterBank``; a view made before adapters were added or removed
    still points at the old buffer.
    """

    def __new__(cls, buffer: nn.Parameter, index: tuple, trainable: bool, bank, key: tuple):
        view = torch.Tensor._make_subclass(cls, buffer.detach()[index], trainable)
        view._buffer, view._index, view._bank, view._key = buffer, index, bank, key
        return view

    @property
    def grad(self):
        g = self._buffer.grad
        if g is None or not self.requires_grad or self._bank._is_cleared(self._key):
            return None
        return g[self._index]

    @grad.setter
    def grad(self, value):
        if value is None:
            self._bank._clear_grad(self._key, self._buffer, self._index)
            return
        if self._buffer.grad is None:
            self._buffer.grad = torch.zeros_like(self._buffer)
        self._buffer.grad[self._index].copy_(value)
        self._bank._cleared.pop(self._key, None)

    def __deepcopy__(self, memo):
        return nn.Parameter(self.detach().clone(), self.requires_grad)

    def __reduce_ex__(self, proto):
        return (nn.Parameter, (self.detach().clone(), self.requires_grad))

    def __repr__(self):
        i, module, kind, _ = self._key
        return f"AdapterView(adapter {i}, {module}.{kind}, shape={tuple(self.shape)})"


def view_index(layout_axis: int, is_ranked: bool, off: int, size: int) -> tuple:
    """The basic index of one adapter's slice: rows/rank [off:off+r], cols [:, off:off+r], out/dense [j]."""
    if not is_ranked:
        return (off,)
    return (slice(off, off + size),) if layout_axis == 0 else (slice(None), slice(off, off + size))
