"""Adapter specifications and the bank that holds every adapter's weights.

``AdapterSpec`` is one adapter's recipe: rank, scaling, init, seed, target modules and its own
optimiser settings. ``AdapterBank`` keeps each adapter's A/B tensors as its own parameters
(so an adapter's optimiser state never moves when others are added or removed) and hands each
module a packed view in layout order at forward time. Packing costs one copy of the adapter
weights per module per forward, sum R * (K + N) elements: for 16 adapters of ranks 1..256 on a
4096x4096 projection that is ~4 M elements, against 16384*4096*4096 MACs for the base GEMM.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lora_engine.kernels.lora import LoRALayout

SCALINGS = ("lora", "rslora")
INITS = ("default", "gaussian")
METHODS = ("lora",)


@dataclass(frozen=True)
class AdapterSpec:
    """One LoRA adapter.

    Args:
        rank: r >= 1 (at most min(in, out) features of every targeted module).
        alpha: LoRA alpha; the update is scaled by alpha/r (``lora``) or alpha/sqrt(r) (``rslora``).
        scaling: ``"lora"`` or ``"rslora"``.
        seed: seeds this adapter's init (and, in the trainer, its sampling), independently of others.
        init: ``"default"`` (PEFT's: A kaiming-uniform, B zero) or ``"gaussian"`` (A ~ N(0, 1/r), B zero).
        target_modules: None (the engine's targets), ``"all-linear"``, or module-name suffixes.
        lr, weight_decay, lora_plus_ratio: this adapter's optimiser settings (B's lr = lr * ratio).
        method: PEFT method; ``"lora"`` here.
        name: optional label for logs and checkpoints.
    """

    rank: int
    alpha: float = 32.0
    scaling: str = "lora"
    seed: int = 0
    init: str = "default"
    target_modules: str | tuple[str, ...] | None = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    lora_plus_ratio: float = 1.0
    method: str = "lora"
    name: str | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"AdapterSpec.rank must be an int >= 1, got {self.rank!r}: use rank=1 or more")
        if self.rank > 4096:
            raise ValueError(f"AdapterSpec.rank={self.rank} is beyond any sensible LoRA rank; use <= 512")
        if self.scaling not in SCALINGS:
            raise ValueError(f"AdapterSpec.scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if self.init not in INITS:
            raise ValueError(f"AdapterSpec.init must be one of {INITS}, got {self.init!r}")
        if self.method not in METHODS:
            raise ValueError(f"AdapterSpec.method must be one of {METHODS}, got {self.method!r}")
        if not self.alpha > 0:
            raise ValueError(f"AdapterSpec.alpha must be > 0, got {self.alpha}")
        if not self.lr >= 0 or not self.lora_plus_ratio > 0 or not self.weight_decay >= 0:
            raise ValueError("AdapterSpec: lr and weight_decay must be >= 0 and lora_plus_ratio > 0")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.scaling == "rslora" else self.rank)

    def to_dict(self) -> dict:
        return asdict(self)


def matches(module_name: str, targets) -> bool:
    """PEFT-style matching: ``"all-linear"`` matches every module given; a list matches by name suffix."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def _key(module_name: str) -> str:
    # ParameterDict keys may not contain dots.
    return module_name.replace(".", "__")


@dataclass
class _ModuleInfo:
    in_features: int
    out_features: int
    device: torch.device
    layout: LoRALayout | None = field(default=None)


class AdapterBank(nn.Module):
    """Every adapter's weights, per targeted module, with stable integer ids.

    Adapter ``i`` owns ``adapters[str(i)].lora_A[key]`` ([r, K]) and ``lora_B[key]`` ([N, r]) for
    each module it targets. Removed ids stay unused (their rank is 0 everywhere), so the ids of
    the other adapters and their optimiser states never change.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.specs: dict[int, AdapterSpec] = {}
        self.modules_info: dict[str, _ModuleInfo] = {}
        self.default_targets = "all-linear"
        self.dtype = dtype
        self.next_id = 0

    # -- registry ------------------------------------------------------------------------
    def register_module_info(self, name: str, in_features: int, out_features: int, device) -> None:
        self.modules_info[name] = _ModuleInfo(in_features, out_features, torch.device(device))

    def targets_of(self, spec: AdapterSpec) -> list[str]:
        targets = spec.target_modules if spec.target_modules is not None else self.default_targets
        return [n for n in self.modules_info if matches(n, targets)]

    @property
    def num_slots(self) -> int:
        """Ids in [0, num_slots) are valid routing targets if present (removed ones are not)."""
        return self.next_id

    def ids(self) -> list[int]:
        return sorted(self.specs)

    # -- add / remove --------------------------------------------------------------------
    def add(self, spec: AdapterSpec) -> int:
        names = self.targets_of(spec)
        if not names:
            raise ValueError(f"adapter targets {spec.target_modules!r} match no wrapped module; wrapped: "
                             f"{list(self.modules_info)[:6]}...: pass names that end one of these")
        for n in names:
            info = self.modules_info[n]
            if spec.rank > min(info.in_features, info.out_features):
                raise ValueError(f"rank {spec.rank} exceeds min(in={info.in_features}, out={info.out_features}) "
                                 f"of module {n}: choose rank <= {min(info.in_features, info.out_features)}")
        gen = torch.Generator().manual_seed(spec.seed)
        mod = nn.Module()
        mod.lora_A = nn.ParameterDict()
        mod.lora_B = nn.ParameterDict()
        for n in sorted(names):
            info = self.modules_info[n]
            a = torch.empty(spec.rank, info.in_features)
            if spec.init == "default":
                # kaiming_uniform_(a=sqrt(5)) on [r, K] is U(-1/sqrt(K), 1/sqrt(K)), as nn.Linear and PEFT do.
                bound = 1.0 / math.sqrt(info.in_features)
                a.uniform_(-bound, bound, generator=gen)
            else:
                a.normal_(0.0, 1.0 / spec.rank, generator=gen)
            b = torch.zeros(info.out_features, spec.rank)
            mod.lora_A[_key(n)] = nn.Parameter(a.to(info.device, self.dtype))
            mod.lora_B[_key(n)] = nn.Parameter(b.to(info.device, self.dtype))
        i = self.next_id
        self.adapters[str(i)] = mod
        self.specs[i] = spec
        self.next_id += 1
        self._invalidate()
        return i

    def remove(self, i: int) -> None:
        if i not in self.specs:
            raise ValueError(f"no adapter with id {i}; present: {self.ids()}")
        del self.adapters[str(i)]
        del self.specs[i]
        self._invalidate()

    def _invalidate(self):
        for info in self.modules_info.values():
            info.layout = None

    # -- access --------------------------------------------------------------------------
    def parameters_of(self, i: int) -> list[nn.Parameter]:
        if i not in self.specs:
            raise ValueError(f"no adapter with id {i}; present: {self.ids()}")
        mod = self.adapters[str(i)]
        return list(mod.lora_A.values()) + list(mod.lora_B.values())

    def named_parameters_of(self, i: int) -> dict[str, nn.Parameter]:
        """{"<module>.lora_A": A, "<module>.lora_B": B} for adapter i, module names with dots."""
        mod = self.adapters[str(i)]
        out = {}
        for k, p in mod.lora_A.items():
            out[k.replace("__", ".") + ".lora_A"] = p
        for k, p in mod.lora_B.items():
            out[k.replace("__", ".") + ".lora_B"] = p
        return out

    def layout(self, name: str) -> LoRALayout:
        """Ranks/scales of all slots on module ``name`` (rank 0 where an adapter is absent)."""
        info = self.modules_info[name]
        if info.layout is None:
            ranks, scales = [], []
            k = _key(name)
            for i in range(self.next_id):
                spec = self.specs.get(i)
                present = spec is not None and k in self.adapters[str(i)].lora_A
                ranks.append(spec.rank if present else 0)
                scales.append(spec.scale if present else 0.0)
            info.layout = LoRALayout(ranks, scales)
        return info.layout

    def packed(self, name: str, dtype: torch.dtype):
        """(A_all [sum R, K], B_all [N, sum R]) in layout order, cast to ``dtype`` (differentiable)."""
        k = _key(name)
        mods = [self.adapters[str(i)] for i in range(self.next_id)
                if i in self.specs and k in self.adapters[str(i)].lora_A]
        info = self.modules_info[name]
        if not mods:
            dev = info.device
            return (torch.zeros(0, info.in_features, device=dev, dtype=dtype),
                    torch.zeros(info.out_features, 0, device=dev, dtype=dtype))
        a = torch.cat([m.lora_A[k] for m in mods], 0).to(dtype)
        b = torch.cat([m.lora_B[k] for m in mods], 1).to(dtype)
        return a, b
