"""``AdapterBank``: every adapter's weights, per targeted module, with stable integer ids.

``AdapterBank`` keeps each adapter's tensors as its own parameters (so an adapter's optimiser
state never moves when others are added or removed) and hands each module a packed view in
layout order at forward time; what each method's tensors are and how they pack is its record
in ``methods.TABLE``. Packing costs one copy of the adapter weights per module per forward,
sum R * (K + N) elements: for 16 adapters of ranks 1..256 on a 4096x4096 projection that is
~4 M elements, against 16384*4096*4096 MACs for the base GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lora_engine.engine import methods
from lora_engine.engine.methods import method_of
from lora_engine.engine.spec import AdapterSpec, layer_index, matches, pattern_key
from lora_engine.kernels.lora import LoRALayout


def _key(module_name: str) -> str:
    # ParameterDict keys may not contain dots.
    return module_name.replace(".", "__")


@dataclass
class _ModuleInfo:
    in_features: int
    out_features: int
    device: torch.device
    weight: torch.Tensor | None = None
    plan: "_Plan | None" = field(default=None)
    w_sq: tuple | None = field(default=None)  # ((device, dtype, data_ptr) of W, ||W_n||^2)


@dataclass(frozen=True)
class _Plan:
    """What one module does for the current adapters: the kernel layout, the slots present, DoRA
    slots (flags per slot for the epilogue) and full fine-tuning slots."""

    layout: LoRALayout
    present: tuple[int, ...]
    dora: tuple[bool, ...]
    full: tuple[int, ...]


class _AdapterWeights(nn.Module):
    """One adapter's tensors: one ParameterDict per kind (``lora_A``, ``lora_B``, ...), keyed by module."""

    def __init__(self, kinds: tuple[str, ...]):
        super().__init__()
        self.kinds = kinds
        for kind in kinds:
            setattr(self, kind, nn.ParameterDict())


class AdapterBank(nn.Module):
    """Every adapter's weights, per targeted module, with stable integer ids.

    Adapter ``i`` owns ``adapters[str(i)].<kind>[key]`` for each module it targets, the kinds
    of its method (its ``methods.TABLE`` record: plain LoRA has ``lora_A`` [r, K] and ``lora_B`` [N, r]).
    Frozen tensors (LoRA-FA's A, PiSSA's init copies) are parameters with requires_grad=False,
    so checkpoints save them. Removed ids stay unused (their rank is 0 everywhere), so the ids
    of the other adapters and their optimiser states never change.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.shared = nn.Module()  # VeRA projections, buffers shared by adapters
        self.specs: dict[int, AdapterSpec] = {}
        self.modules_info: dict[str, _ModuleInfo] = {}
        self.default_targets = "all-linear"
        self.dtype = dtype
        self.next_id = 0
        self._targets: dict[int, list[str]] = {}
        self._vera: dict[int, str] = {}

    # -- registry ------------------------------------------------------------------------
    def register_module_info(self, name: str, in_features: int, out_features: int, device,
                             weight: torch.Tensor | None = None) -> None:
        """``weight`` ([N, K], frozen) is needed by the methods that read W: DoRA, PiSSA, MiLoRA."""
        self.modules_info[name] = _ModuleInfo(in_features, out_features, torch.device(device), weight)

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
    def add(self, spec: AdapterSpec) -> int:
        names = sorted(self.targets_of(spec))
        if not names:
            raise ValueError(f"adapter targets {spec.target_modules!r} (layers {spec.layers}) match no wrapped "
                             f"module; wrapped: {list(self.modules_info)[:6]}...: pass names that end one of these")
        for attr in ("rank_pattern", "alpha_pattern"):
            unused = [k for k in getattr(spec, attr) or {} if not any(pattern_key([k], n) for n in names)]
            if unused:
                raise ValueError(f"{attr} key(s) {unused} match none of the adapter's modules (e.g. {names[0]}): "
                                 "use a module-name suffix such as 'q_proj' or 'layers.0.mlp.down_proj'")
        method = method_of(spec)
        for n in names:
            info = self.modules_info[n]
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
        i = self.next_id
        vera = self._vera_projection(spec, names) if method.shared_projection else None
        # Seeded by the spec alone, drawn module after module in sorted order: an adapter's init
        # never depends on the other adapters.
        gen = torch.Generator().manual_seed(spec.seed)
        mod = _AdapterWeights(method.kinds)
        for n in names:
            info = self.modules_info[n]
            tensors = method.init(spec, n, info.in_features, info.out_features, info.weight, gen)
            for kind, t in tensors.items():
                getattr(mod, kind)[_key(n)] = nn.Parameter(
                    t.to(info.device, self.dtype), requires_grad=method.is_trainable(kind))
        self.adapters[str(i)] = mod
        self.specs[i] = spec
        self._targets[i] = names
        if vera is not None:
            self._vera[i] = vera
        self.next_id += 1
        self._invalidate()
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
        del self.adapters[str(i)]
        del self.specs[i]
        del self._targets[i]
        self._vera.pop(i, None)
        self._invalidate()

    def _invalidate(self):
        for info in self.modules_info.values():
            info.plan = None

    # -- access --------------------------------------------------------------------------
    def parameters_of(self, i: int) -> list[nn.Parameter]:
        """Adapter ``i``'s trainable tensors (frozen ones, e.g. LoRA-FA's A, are left out)."""
        return [p for p in self.named_parameters_of(i).values() if p.requires_grad]

    def named_parameters_of(self, i: int) -> dict[str, nn.Parameter]:
        """{"<module>.<kind>": tensor} for adapter i, frozen ones included (checkpoints save them).

        Kinds per method in its ``methods.TABLE`` record; plain LoRA gives "<module>.lora_A" and "<module>.lora_B".
        """
        self._check_id(i)
        mod = self.adapters[str(i)]
        return {k.replace("__", ".") + "." + kind: p
                for kind in mod.kinds for k, p in getattr(mod, kind).items()}

    def tensors(self, i: int, name: str) -> dict[str, nn.Parameter]:
        """{kind: tensor} of adapter ``i`` on module ``name``."""
        mod = self.adapters[str(i)]
        k = _key(name)
        return {kind: getattr(mod, kind)[k] for kind in mod.kinds}

    def vera_of(self, i: int):
        """(A_v [r, K_max], B_v [N_max, r]) shared projections of VeRA adapter ``i``, else None."""
        name = self._vera.get(i)
        return None if name is None else (getattr(self.shared, name + "_A"), getattr(self.shared, name + "_B"))

    def plan(self, name: str) -> _Plan:
        """Ranks/scales of all slots on module ``name`` (rank 0 where an adapter is absent), and
        which slots need the DoRA epilogue or a dense full fine-tuning term; cached."""
        info = self.modules_info[name]
        if info.plan is None:
            ranks, scales, present, dora, full = [], [], [], [], []
            for i in range(self.next_id):
                spec = self.specs.get(i)
                on = spec is not None and name in self._targets[i]
                method = method_of(spec) if on else None
                ranks.append(method.kernel_rank(spec, name) if on else 0)
                scales.append(spec.scale_for(name) if on else 0.0)
                dora.append(on and method.epilogue == "column_scale")
                if on:
                    present.append(i)
                    if method.epilogue == "dense":
                        full.append(i)
            info.plan = _Plan(LoRALayout(ranks, scales), tuple(present), tuple(dora), tuple(full))
        return info.plan

    def layout(self, name: str) -> LoRALayout:
        """Ranks/scales of all slots on module ``name`` (rank 0 where an adapter is absent)."""
        return self.plan(name).layout

    def packed(self, name: str, dtype: torch.dtype, memo: dict | None = None):
        """(A_all [sum R, K], B_all [N, sum R]) in layout order, cast to ``dtype`` (differentiable).

        ``memo``: as for ``dora_scale``, a dict valid while the adapter weights cannot change (one
        no-grad routing context); generation then packs each module once, not once per token.
        """
        if memo is not None:
            # Tensor version counters in the key: an in-place update inside the context repacks.
            versions = tuple(t._version for i in self.plan(name).present for t in self.tensors(i, name).values())
            key = ("packed", name, dtype, versions)
            if key not in memo:
                memo[key] = self.packed(name, dtype)
            return memo[key]
        info = self.modules_info[name]
        plan = self.plan(name)
        a_list, b_list = [], []
        for i in plan.present:
            if plan.layout.ranks[i] == 0:
                continue
            a, b = method_of(self.specs[i]).pack(self.specs[i], self.tensors(i, name), info.in_features,
                                                 info.out_features, self.vera_of(i))
            a_list.append(a)
            b_list.append(b)
        if not a_list:
            return (torch.zeros(0, info.in_features, device=info.device, dtype=dtype),
                    torch.zeros(info.out_features, 0, device=info.device, dtype=dtype))
        return torch.cat(a_list, 0).to(dtype), torch.cat(b_list, 1).to(dtype)

    def dora_scale(self, name: str, weight: torch.Tensor, adapters, memo: dict | None = None) -> torch.Tensor:
        """[num_slots, N] fp32: m_a / ||W + s_a B_a A_a||_c on the rows of the DoRA ``adapters``, 1 elsewhere.

        Differentiable in m only (the norm is detached, as PEFT). ``memo``: a dict valid while
        the adapter weights cannot change (one no-grad routing context, i.e. a generation),
        where the norms are kept: generation calls every layer once per token.
        """
        info = self.modules_info[name]
        if info.w_sq is None or info.w_sq[0] != (weight.device, weight.dtype, weight.data_ptr()):
            # W is frozen; only a move or cast of the base model (.to/.cuda) changes it.
            info.w_sq = ((weight.device, weight.dtype, weight.data_ptr()), methods.column_norm_sq(weight))
        w_sq = info.w_sq[1]
        adapters, rows = list(adapters), []
        for i in adapters:
            t = self.tensors(i, name)
            key = ("dora", name, i, t["lora_A"]._version, t["lora_B"]._version)
            norm = memo.get(key) if memo is not None else None
            if norm is None:
                norm = methods.dora_norm(weight, t["lora_A"], t["lora_B"], self.specs[i].scale_for(name), w_sq)
                if memo is not None:
                    memo[key] = norm
            rows.append(t["lora_magnitude_vector"].float() / norm)
        # Stacked per slot rather than index_copy'd into ones: no host->device index tensor per layer.
        ones = torch.ones(info.out_features, device=weight.device, dtype=torch.float32)
        by_slot = dict(zip(adapters, rows))
        return torch.stack([by_slot.get(i, ones) for i in range(self.next_id)])

    def full_delta(self, i: int, name: str) -> nn.Parameter:
        """Dense dW [N, K] of the full fine-tuning adapter ``i`` on module ``name``."""
        return self.adapters[str(i)].delta_weight[_key(name)]
