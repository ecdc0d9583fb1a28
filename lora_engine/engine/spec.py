"""``AdapterSpec``, one adapter's recipe, and PEFT-style module matching.

``AdapterSpec`` holds the PEFT method, rank (per module with ``rank_pattern``), scaling, init,
seed, target modules and layers, and the adapter's own optimiser settings. What each method
means (its tensors, init, packing) is its record in ``methods.TABLE``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields

from lora_engine.checks import check_types
from lora_engine.engine.adalora import AdaLoraSchedule
from lora_engine.engine.methods import METHODS, TABLE

SCALINGS = ("lora", "rslora")
INITS = ("default", "gaussian")
# target_modules groups: a module belongs to one when its parent module has one of these names.
TARGET_GROUPS = {"attention": ("self_attn", "attn", "attention", "self_attention"),
                 "mlp": ("mlp", "feed_forward", "ffn")}


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter.

    Args:
        rank: r >= 1 (at most min(in, out) features of every targeted module; PiSSA/MiLoRA at
            most half of it). Ignored by ``method="full"``.
        alpha: LoRA alpha; the update is scaled by alpha/r (``lora``) or alpha/sqrt(r) (``rslora``).
        scaling: ``"lora"`` or ``"rslora"`` (``method="rslora"`` sets it).
        seed: seeds this adapter's init (and, in the trainer, its sampling), independently of others.
        init: ``"default"`` (PEFT's: A kaiming-uniform, B zero) or ``"gaussian"`` (A ~ N(0, 1/r), B zero).
        target_modules: None (the engine's targets), ``"all-linear"``, ``"attention"``, ``"mlp"``,
            module-name suffixes (``("q_proj", "v_proj")``) or a regex matched against full names.
        lr, weight_decay, lora_plus_ratio: this adapter's optimiser settings (B's lr = lr * ratio;
            ratio defaults to 16 for ``method="lora_plus"``, 1 otherwise).
        method: one of ``methods.METHODS``: lora, rslora, lora_plus, lora_fa, dora, pissa,
            milora, vera, full, adalora, miss, ia3, ln_tuning (one record each in
            ``lora_engine.engine.methods.TABLE``). ``rank`` is ignored by ia3 and ln_tuning.
        name: optional label for logs and checkpoints.
        rank_pattern, alpha_pattern: PEFT's per-module overrides, ``{key: rank}`` / ``{key: alpha}``;
            key k applies to modules whose name matches ``(.*\\.)?(k)$`` (first match wins).
        layers: only modules of these layer indices (PEFT's ``layers_to_transform``).
        projection_prng_key, d_initial: VeRA's shared-projection seed and the init of d (PEFT's names).
        feedforward_modules: IA3's modules whose input (not output) is scaled, as PEFT's
            (name suffixes or a regex; None: ``down_proj``).
        adalora: AdaLoRA's budget schedule (an ``AdaLoraSchedule`` or a table of its fields;
            None: its defaults); only with ``method="adalora"``.
    """

    rank: int
    alpha: float = 32.0
    scaling: str = "lora"
    seed: int = 0
    init: str = "default"
    target_modules: str | tuple[str, ...] | None = None
    lr: float = 1e-5
    weight_decay: float = 0.0
    lora_plus_ratio: float | None = None
    method: str = "lora"
    name: str | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    layers: tuple[int, ...] | None = None
    projection_prng_key: int = 0
    d_initial: float = 0.1
    feedforward_modules: str | tuple[str, ...] | None = None
    adalora: AdaLoraSchedule | None = None

    def __post_init__(self):
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            object.__setattr__(self, "layers", (self.layers,))
        if isinstance(self.feedforward_modules, list):
            object.__setattr__(self, "feedforward_modules", tuple(self.feedforward_modules))
        if isinstance(self.adalora, dict):
            known = {f.name for f in fields(AdaLoraSchedule)}
            bad = sorted(set(self.adalora) - known)
            if bad:
                raise ValueError(f"AdapterSpec.adalora: unknown field(s) {bad}; known: {sorted(known)}")
            object.__setattr__(self, "adalora", AdaLoraSchedule(**self.adalora))
        if self.adalora is None and self.method == "adalora":
            object.__setattr__(self, "adalora", AdaLoraSchedule())
        check_types(self)
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
        method = TABLE[self.method]
        if method.scaling is not None:
            object.__setattr__(self, "scaling", method.scaling)
        if self.lora_plus_ratio is None:
            object.__setattr__(self, "lora_plus_ratio", method.lora_plus_ratio)
        if not self.alpha > 0:
            raise ValueError(f"AdapterSpec.alpha must be > 0, got {self.alpha}")
        if not self.lr >= 0 or not self.lora_plus_ratio > 0 or not self.weight_decay >= 0:
            raise ValueError("AdapterSpec: lr and weight_decay must be >= 0 and lora_plus_ratio > 0")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        self._check_patterns()
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            if not layers or any(not isinstance(x, int) or x < 0 for x in layers):
                raise ValueError(f"AdapterSpec.layers must be layer indices >= 0, got {self.layers!r}: "
                                 "e.g. layers=(0, 1), or None for every layer")
            object.__setattr__(self, "layers", layers)
        if not self.d_initial > 0 or not isinstance(self.projection_prng_key, int):
            raise ValueError("AdapterSpec: d_initial must be > 0 and projection_prng_key an int")
        if self.adalora is not None and self.method != "adalora":
            raise ValueError(f"AdapterSpec.adalora is AdaLoRA's schedule; method is {self.method!r}: drop it "
                             "or set method='adalora'")
        if self.feedforward_modules is not None and self.method != "ia3":
            raise ValueError(f"AdapterSpec.feedforward_modules is IA3's; method is {self.method!r}: drop it")

    def _check_patterns(self):
        for attr, kind in (("rank_pattern", int), ("alpha_pattern", float)):
            pat = getattr(self, attr)
            if pat is None:
                continue
            if not isinstance(pat, dict):
                raise ValueError(f"AdapterSpec.{attr} must be a dict {{module key: value}}, got {type(pat).__name__}")
            if pat and not TABLE[self.method].per_module_ranks:
                raise ValueError(f"AdapterSpec.{attr} does not apply to method {self.method!r}: VeRA shares one "
                                 "rank-r projection across modules and full fine-tuning has no rank; drop it")
            for k, v in pat.items():
                try:
                    re.compile(k)
                except re.error as e:
                    raise ValueError(f"AdapterSpec.{attr} key {k!r} is not a valid regex ({e})") from None
                ok = (isinstance(v, int) and 1 <= v <= 4096) if kind is int else (isinstance(v, (int, float)) and v > 0)
                if not ok:
                    raise ValueError(f"AdapterSpec.{attr}[{k!r}] = {v!r}: ranks must be ints in [1, 4096], "
                                     "alphas > 0")
            object.__setattr__(self, attr, dict(pat))

    def __hash__(self):
        # The pattern dicts make the generated field hash fail; hash the canonical form instead.
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def rank_for(self, module: str) -> int:
        """The rank of this adapter on ``module`` (``rank_pattern`` first, then ``rank``)."""
        key = pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.rank

    def alpha_for(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha

    def scale_for(self, module: str) -> float:
        """s on ``module``: alpha/r or alpha/sqrt(r) with that module's rank and alpha; 1 for VeRA/full."""
        method = TABLE[self.method]
        if not method.scaled:
            return 1.0
        r, a = self.rank_for(module), self.alpha_for(module)
        if method.scale_rule is not None:
            return method.scale_rule(r, a)
        return a / (math.sqrt(r) if self.scaling == "rslora" else r)

    @property
    def scale(self) -> float:
        """s of the modules without a pattern override."""
        method = TABLE[self.method]
        if not method.scaled:
            return 1.0
        if method.scale_rule is not None:
            return method.scale_rule(self.rank, self.alpha)
        return self.alpha / (math.sqrt(self.rank) if self.scaling == "rslora" else self.rank)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_index(module_name: str) -> int | None:
    """PEFT's layer index: the first numbered path segment (``model.layers.3.mlp.up_proj`` -> 3)."""
    m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    return int(m.group("idx")) if m else None


def matches(module_name: str, targets) -> bool:
    """PEFT-style matching: ``"all-linear"`` matches every module given; ``"attention"``/``"mlp"`` by
    parent module name; another string is a regex on the full name; a list matches by name suffix."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str) and targets in TARGET_GROUPS:
        parent = module_name.split(".")[-2] if "." in module_name else ""
        return parent in TARGET_GROUPS[targets]
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def pattern_key(patterns, module: str):
    """PEFT's ``get_pattern_key``: the first key k with ``(.*\\.)?(k)$`` matching the module name."""
    for key in patterns or ():
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None
