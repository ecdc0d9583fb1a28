"""Trainer configuration: one frozen dataclass, loadable from TOML with ``key=value`` overrides.

    model = "tiny"                 # or a local path to any HF causal LM (+ its tokenizer)
    task = "tiny"                  # the embedded arithmetic task, or "reasoning_gym:<dataset>"
    steps = 40
    [[adapters]]
    rank = 1
    lr = 2e-3
    [[adapters]]
    rank = 16
    ...
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from lora_engine.engine.spec import AdapterSpec
from lora_engine.kernels.policy_loss import LOSS_TYPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



@dataclass(frozen=True)
class TrainConfig:
    """Everything a GRPO run over several concurrent adapters needs. See examples/tiny.toml."""

    adapters: tuple[AdapterSpec, ...] = ()
    model: str = "tiny"
    task: str = "tiny"
    target_modules: str | tuple[str, ...] = "all-linear"
    output_dir: str = "runs/tiny"
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    # rollouts
    steps: int = 40
    prompts_per_step: int = 8
    # Optional per-adapter prompts per step (same order as adapters): lets one group hold
    # adapters of different batch sizes, as the sweep runner packs them.
    adapter_prompts_per_step: tuple[int, ...] = ()
    samples_per_prompt: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    # objective
    loss_type: str = "dapo"
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    scale_rewards: str = "std"
    drop_zero_variance: bool = False
    inner_updates: int = 1
    # sequences per forward/backward (gradient accumulation); 0 = the whole rollout batch at once.
    # Changes peak memory, not the update: every adapter's loss keeps its whole-batch normaliser.
    micro_batch_size: int = 0
    max_grad_norm: float = 1.0
    # rewards (the task's correctness reward is always on)
    format_weight: float = 0.0   # x boxed_format_reward (+bonus one box, -penalty none)
    length_weight: float = 0.0   # coef of rewards.length_penalty (DAPO's soft overlong penalty)
    # evaluation and checkpoints
    eval_problems: int = 200
    eval_every: int = 0
    eval_samples: int = 0  # > 0: also sample this many completions per eval problem (avg@n, pass@k)
    checkpoint_every: int = 10
    resume: bool = True
    progress: bool = True

    def __post_init__(self):
        if not self.adapters:
            raise ValueError("config has no adapters: add at least one [[adapters]] table with a rank")
        specs = tuple(a if isinstance(a, AdapterSpec) else _spec(a) for a in self.adapters)
        object.__setattr__(self, "adapters", specs)
        object.__setattr__(self, "adapter_prompts_per_step", tuple(self.adapter_prompts_per_step))
        if self.adapter_prompts_per_step and len(self.adapter_prompts_per_step) != len(specs):
            raise ValueError(f"adapter_prompts_per_step has {len(self.adapter_prompts_per_step)} entries for "
                             f"{len(specs)} adapters: give one per adapter or leave it empty")
        if any(n < 1 for n in self.adapter_prompts_per_step):
            raise ValueError("adapter_prompts_per_step entries must be >= 1")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in ("std", "none"):
            raise ValueError(f"scale_rewards must be 'std' or 'none' (Dr.GRPO), got {self.scale_rewards!r}")
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "inner_updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 0:
            raise ValueError(f"micro_batch_size must be an int >= 0 (0 = the whole batch at once), "
                             f"got {self.micro_batch_size!r}")
        if self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2: group-normalised advantages need a group")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["adapters"] = [a.to_dict() for a in self.adapters]
        return d


def _spec(d: dict) -> AdapterSpec:
    if not isinstance(d, dict):
        raise ValueError(f"each adapter must be a table like {{rank = 8}}, got {d!r}")
    known = {f.name for f in fields(AdapterSpec)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown adapter field(s) {sorted(unknown)}; known: {sorted(known)}")
    return AdapterSpec(**d)


def _parse_value(text: str):
    """TOML-typed value for a --set override (strings may be given bare)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a TOML file into a ``TrainConfig``; ``overrides`` are ``key=value`` strings."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {path} does not exist: pass the path of a TOML file "
                         "such as examples/tiny.toml")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from None
    return config_from_dict(data, overrides)


def config_from_dict(data: dict, overrides=()) -> TrainConfig:
    data = dict(data)
    known = {f.name for f in fields(TrainConfig)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value, e.g. steps=10")
        key, value = item.split("=", 1)
        key = key.strip()
        if key.startswith("adapters."):
            # adapters.<i>.<field>=value
            _, idx, fname = key.split(".", 2)
            data["adapters"] = [dict(a) for a in data.get("adapters", [])]
            data["adapters"][int(idx)][fname] = _parse_value(value)
            continue
        if key not in known:
            raise ValueError(f"unknown config key {key!r}; known: {sorted(known)}")
        data[key] = _parse_value(value)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
    data["adapters"] = tuple(data.get("adapters", ()))
    return TrainConfig(**data)


def save_config(cfg: TrainConfig, path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2, default=str))


def replace(cfg: TrainConfig, **changes) -> TrainConfig:
    return dataclasses.replace(cfg, **changes)
