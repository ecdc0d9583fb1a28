"""Trainer configuration: one frozen dataclass, loadable from TOML with ``key=value`` overrides.

    model = "tiny"                 # or a local HF folder, or a GGUF file (converted once, cached)
    task = "tiny"                  # the embedded arithmetic task, "reasoning_gym:<dataset>" or "math:<path>"
    data_seed = 0                  # the task's problem pool and held-out split
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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lora_engine.checks import check_types
from lora_engine.engine.spec import AdapterSpec
from lora_engine.kernels.policy_loss import (LOSS_OPTION_DEFAULTS, LOSS_TYPES, SEQUENCE_ADVANTAGE_ONLY,
                                             check_loss_options)
from lora_engine.rl.answers import EXTRACTORS
from lora_engine.rl.models import DTYPES
from lora_engine.rl.ppo import KL_KINDS
from lora_engine.rl.prm import PRM_KINDS
from lora_engine.rl.tasks.scoring import SCORERS
from lora_engine.rl.token_rewards import REGIMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



@dataclass(frozen=True)
class TrainConfig:
    """Everything a GRPO or PPO run over several concurrent adapters needs. See examples/tiny.toml.

    Every field's type is checked when the config is built; a bad value is a one-line
    ``ValueError`` naming the fix.
    """

    # --- model ------------------------------------------------------------------------------
    model: str = "tiny"                        # "tiny" (built in, CPU-sized), a local HF folder or a .gguf file
    adapters: tuple[AdapterSpec, ...] = ()     # one [[adapters]] table per adapter (AdapterSpec fields)
    target_modules: str | tuple[str, ...] = "all-linear"  # linear layers adapters may use
    dtype: str = "auto"                        # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"                       # "auto" (CUDA if present), "cpu", "cuda", "cuda:1", ...
    # --- rollout ------------------------------------------------------------------------------
    task: str = "tiny"                         # "tiny", "reasoning_gym:<dataset>" or "math:<local data path>"
    data_seed: int = 0                         # the task's data: its problem pool and held-out split
    task_options: dict[str, Any] = field(default_factory=dict)  # reasoning-gym settings or math data fields
    eval_data: str = ""                        # held-out set: "" (the task's own split), a data path, "champ"
    prompts_per_step: int | tuple[int, ...] = 8  # per adapter per step: one for all, or one per adapter
    samples_per_prompt: int = 8                # G, the group size of the advantages
    max_new_tokens: int = 8                    # the generation cap (also dr_grpo's length normaliser)
    temperature: float = 1.0                   # sampling temperature (the log-probs use it too)
    top_p: float = 1.0                         # nucleus sampling
    rollout_batch_size: int = 0                # sequences per decoding batch (caps rollout memory); 0 = all
    # --- prompts ------------------------------------------------------------------------------
    system_prompt: str = ""                    # system message ("" = none; a template may add its default)
    instruction: str = ""                      # appended to each question ("{question}" places it instead)
    chat_template: bool | str = "auto"         # use the tokenizer's chat template: true, false, "auto" (if any)
    enable_thinking: bool = True               # passed to the chat template (Qwen3: false = no <think>)
    few_shot: int = 0                          # worked examples from the train split shown before each question
    few_shot_examples: tuple[tuple[str, str], ...] = ()  # your own [question, reply] pairs, shown first
    # --- objective ----------------------------------------------------------------------------
    algorithm: str = "grpo"                    # "grpo" (group-normalised advantages) or "ppo" (a critic per adapter)
    loss_type: str = "dapo"                    # TRL 1.16's, per adapter: grpo bnpo dr_grpo dapo cispo sapo luspo vespo
    eps_low: float = 0.2                       # clip range [1 - eps_low, 1 + eps_high] of the ratio
    eps_high: float = 0.2                      # (cispo: the ratio's cap itself; TRL suggests 5.0)
    delta: float | None = None                 # two-sided clipping: upper bound on the unclipped ratio
    beta: float = 0.0                          # KL coefficient to the base (the adapter off)
    kl_correction: bool = False                # k3 x importance ratio (TRL's use_bias_correction_kl,
                                               # its default: TRL parity needs true), else plain k3
    sapo_temperature_pos: float = 1.0          # sapo: sigmoid temperature for A > 0 (TRL's default)
    sapo_temperature_neg: float = 1.05         # sapo: for A <= 0
    vespo_k_pos: float = 2.0                   # vespo: (k, lambda) of its weight for A >= 0 ...
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0                   # ... and for A < 0
    vespo_lambda_neg: float = 2.0
    scale_rewards: str = "std"                 # "std" (GRPO) or "none" (Dr.GRPO) advantage scaling
    drop_zero_variance: bool = False           # drop groups whose rewards are all equal
    scorer: str = "auto"                       # correctness: auto (the task's) | math_verify | exact | reasoning_gym
    answer_extractors: tuple[str, ...] = ("boxed", "answer_tag")  # where answers are read; + "last_number"
    verify_timeout: float = 5.0                # seconds per math-verify check (a hang scores 0, is counted)
    correct_weight: float = 1.0                # x correctness (1/0) in the reward
    format_weight: float = 0.0                 # x boxed_format_reward (+bonus for one box, -penalty for none)
    length_weight: float = 0.0                 # coef of rewards.length_penalty (DAPO's soft overlong penalty)
    length_buffer: int = 0                     # the penalty ramps over this many tokens before the cap; 0 = cap/5
    # --- PPO (algorithm = "ppo"; rl/ppo_step.py, verl's definitions) ----------------------------
    critic_rank: int = 0                       # rank of each policy's critic LoRA (0: the policy's rank)
    critic_lr: float = 0.0                     # the critic's and its value head's lr (0: the policy's lr)
    critic_warmup_steps: int = 0               # the first N steps update the critics only
    vf_coef: float = 1.0                       # x the value loss (before the critic's gradient clipping)
    value_clip: float = 0.5                    # clipped value loss range around the old values (verl's
                                               # cliprange_value); 0 = the plain squared error
    gamma: float = 1.0                         # GAE discount (verl's default)
    lam: float = 1.0                           # GAE lambda (verl's default)
    kl_penalty: str = "reward"                 # where beta's KL goes: "reward" (per token, verl / OpenRLHF)
                                               # or "loss" (the policy loss's k3, as GRPO)
    kl_estimator: str = "kl"                   # the in-reward estimator: kl (k1), abs, mse, low_var_kl (k3)
    whiten_advantages: bool = True             # whiten GAE advantages over each adapter's tokens (verl)
    # --- token-level rewards (rl.token_rewards; study C) --------------------------------------
    reward_regime: str | tuple[str, ...] = "outcome"  # outcome | process | distillation; one for all or one per adapter
    dense_threshold: float = 0.5               # deposits per valid token above which a group is dense
                                               # (per-token normalisation), else sparse (return-to-go)
    prm_model: str = "tiny"                    # process: "tiny" (rl.tiny_judges) or a local PRM folder
    prm_kind: str = ""                         # math_shepherd | classifier ("": the PRM's prm.json, else math_shepherd)
    prm_step_tag: str = ""                     # math_shepherd's tag ("": prm.json's, else Math-Shepherd's " ки")
    step_separator: str = ""                   # where steps end ("": prm.json's, else "\n")
    teacher_model: str = "tiny"                # distillation: "tiny" or a local folder with the student's vocabulary
    # --- optimisation -------------------------------------------------------------------------
    steps: int = 40                            # training steps (rollout + update each)
    inner_updates: int = 1                     # optimiser steps per rollout batch (> 1: PPO-style reuse)
    micro_batch_size: int = 0                  # sequences per forward/backward; 0 = the whole batch at once
    max_grad_norm: float = 1.0                 # per-adapter gradient clipping
    loss_scale: float = 0.0                    # static loss scale (needed for float16: 1024 is typical); 0 = off
    # --- evaluation ---------------------------------------------------------------------------
    eval_problems: int = 200                   # held-out problems, greedy pass@1 per adapter
    eval_every: int = 0                        # steps between evaluations (0: start and end only)
    eval_samples: int = 0                      # > 0: also sample this many per problem (avg@n, pass@n)
    # --- checkpoints and output ---------------------------------------------------------------
    output_dir: str = "runs/tiny"              # config, logs, summary and checkpoints land here
    checkpoint_every: int = 10                 # steps between checkpoints (0: at the end only)
    resume: bool = True                        # continue from output_dir's latest checkpoint
    progress: bool = True                      # progress bars

    def __post_init__(self):
        if not self.adapters:
            raise ValueError("config has no adapters: add at least one [[adapters]] table with a rank")
        if not isinstance(self.adapters, (tuple, list)):
            raise ValueError("adapters must be a list of [[adapters]] tables, each with a rank")
        specs = tuple(a if isinstance(a, AdapterSpec) else _spec(a) for a in self.adapters)
        object.__setattr__(self, "adapters", specs)
        for name in ("target_modules", "prompts_per_step", "answer_extractors", "reward_regime"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.few_shot_examples, list):
            object.__setattr__(self, "few_shot_examples", tuple(tuple(x) if isinstance(x, list) else x
                                                                for x in self.few_shot_examples))
        check_types(self)
        pps = self.prompts_per_step
        if isinstance(pps, tuple) and len(pps) != len(specs):
            raise ValueError(f"prompts_per_step has {len(pps)} entries for {len(specs)} adapters: give one "
                             "number for all adapters or one per adapter")
        regimes = self.reward_regime if isinstance(self.reward_regime, tuple) else (self.reward_regime,)
        if isinstance(self.reward_regime, tuple) and len(regimes) != len(specs):
            raise ValueError(f"reward_regime has {len(regimes)} entries for {len(specs)} adapters: give one regime "
                             "for all adapters or one per adapter")
        if any(r not in REGIMES for r in regimes):
            raise ValueError(f"reward_regime must be one of {REGIMES} (or a list of them), got {self.reward_regime!r}")
        if not 0 <= self.dense_threshold < 1:
            raise ValueError(f"dense_threshold must be in [0, 1) (deposits per valid token), got {self.dense_threshold}")
        if self.prm_kind not in ("",) + PRM_KINDS:
            raise ValueError(f"prm_kind must be one of {PRM_KINDS} (or empty: the PRM's own), got {self.prm_kind!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPES)}, got {self.loss_type!r}")
        check_loss_options(**self.loss_options)
        if self.scale_rewards not in ("std", "none"):
            raise ValueError(f"scale_rewards must be 'std' or 'none' (Dr.GRPO), got {self.scale_rewards!r}")
        for name in ("steps", "samples_per_prompt", "max_new_tokens", "inner_updates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(n < 1 for n in self.prompts_per_adapter):
            raise ValueError(f"prompts_per_step must be >= 1, got {self.prompts_per_step}")
        for name in ("micro_batch_size", "rollout_batch_size", "few_shot", "length_buffer", "eval_problems",
                     "eval_every", "eval_samples", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)}"
                                 + (" (0 = the whole batch at once)" if name.endswith("batch_size") else ""))
        if self.chat_template not in (True, False, "auto"):
            raise ValueError(f"chat_template must be true, false or \"auto\", got {self.chat_template!r}")
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        bad = [e for e in self.answer_extractors if e not in EXTRACTORS]
        if bad or not self.answer_extractors:
            raise ValueError(f"answer_extractors must be a non-empty list of {sorted(EXTRACTORS)}, got "
                             f"{list(self.answer_extractors)}: e.g. answer_extractors = [\"boxed\", \"last_number\"]")
        if self.verify_timeout <= 0:
            raise ValueError(f"verify_timeout must be > 0 seconds, got {self.verify_timeout}")
        if self.length_buffer > self.max_new_tokens:
            raise ValueError(f"length_buffer must be <= max_new_tokens ({self.max_new_tokens}), "
                             f"got {self.length_buffer}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        _check_ppo(self)  # PPO's fields, checked whatever the algorithm (a typo shows before a switch to PPO)
        if any(spec.method == "adalora" for spec in self.adapters) and (self.algorithm == "ppo"
                                                                        or self.inner_updates > 1):
            raise ValueError("AdaLoRA's rank budget counts one optimiser step per trainer step: use it with "
                             "algorithm = \"grpo\" and inner_updates = 1, or another method")
        if self.algorithm != "ppo" and self.samples_per_prompt < 2:
            raise ValueError("samples_per_prompt must be >= 2: group-normalised advantages need a group")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.loss_scale < 0:
            raise ValueError(f"loss_scale must be >= 0 (0 = off), got {self.loss_scale}")
        if self.dtype == "float16" and not self.loss_scale:
            # The fused log-prob backward keeps its dz buffer in the model dtype: at a DAPO mean over
            # 16k tokens the upstream gradients are ~6e-5 and fp16 loses 1.6% of dh to underflow.
            raise ValueError("float16 training underflows the gradients without loss scaling: set loss_scale = 1024, "
                             "or use dtype = \"bfloat16\" (or \"auto\")")

    @property
    def loss_options(self) -> dict:
        """The loss-type hyperparameters ``ops.policy_loss`` takes beyond the clip range and beta."""
        return {k: getattr(self, k) for k in LOSS_OPTION_DEFAULTS}

    @property
    def regime_per_adapter(self) -> tuple[str, ...]:
        """The reward regime of each adapter, in ``adapters`` order."""
        r = self.reward_regime
        return r if isinstance(r, tuple) else (r,) * len(self.adapters)

    @property
    def prompts_per_adapter(self) -> tuple[int, ...]:
        """Prompts per step of each adapter, in ``adapters`` order."""
        pps = self.prompts_per_step
        return pps if isinstance(pps, tuple) else (pps,) * len(self.adapters)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["adapters"] = [a.to_dict() for a in self.adapters]
        return d


ALGORITHMS = ("grpo", "ppo")


def _check_ppo(cfg: TrainConfig) -> None:
    if cfg.algorithm == "ppo" and cfg.loss_type in SEQUENCE_ADVANTAGE_ONLY:  # PPO's GAE advantages are per token
        raise ValueError(f"loss_type {cfg.loss_type!r} weighs each sequence by one factor and needs one advantage "
                         "per sequence, but algorithm = \"ppo\" gives one per token: use another loss_type "
                         "(e.g. \"dapo\") or algorithm = \"grpo\"")
    if cfg.algorithm == "ppo" and cfg.drop_zero_variance:
        raise ValueError("drop_zero_variance is for GRPO's groups: set drop_zero_variance = false with algorithm = \"ppo\"")
    if cfg.algorithm == "ppo" and cfg.critic_warmup_steps >= cfg.steps:
        raise ValueError(f"critic_warmup_steps ({cfg.critic_warmup_steps}) must be < steps ({cfg.steps}): "
                         "the policies would never be updated")
    for name in ("critic_rank", "critic_warmup_steps"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be an int >= 0, got {getattr(cfg, name)}")
    for name in ("critic_lr", "value_clip"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0: {'the policy lr' if name == 'critic_lr' else 'no clipping'}), "
                             f"got {getattr(cfg, name)}")
    if not cfg.vf_coef > 0:
        raise ValueError(f"vf_coef must be > 0, got {cfg.vf_coef}")
    for name in ("gamma", "lam"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.kl_penalty not in ("reward", "loss"):
        raise ValueError(f"kl_penalty must be \"reward\" (per-token KL in the reward) or \"loss\", got {cfg.kl_penalty!r}")
    if cfg.kl_estimator not in KL_KINDS:
        raise ValueError(f"kl_estimator must be one of {KL_KINDS}, got {cfg.kl_estimator!r}")


# Keys older configs used, and what they are now.
RENAMED = {"seed": "data_seed", "adapter_prompts_per_step": "prompts_per_step"}


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
    """A ``TrainConfig`` from TOML-shaped data plus ``key=value`` overrides (``adapters.<i>.<field>=v``)."""
    data = _renamed(dict(data))
    known = {f.name for f in fields(TrainConfig)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value, e.g. steps=10")
        key, value = item.split("=", 1)
        key = RENAMED.get(key.strip(), key.strip())
        if key.startswith("adapters."):
            parts = key.split(".", 2)
            adapters = [dict(a) for a in data.get("adapters", [])]
            if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(adapters):
                raise ValueError(f"override {item!r}: use adapters.<i>.<field>=value with i in "
                                 f"0..{len(adapters) - 1}, e.g. adapters.0.lr=1e-3")
            adapters[int(parts[1])][parts[2]] = _parse_value(value)
            data["adapters"] = adapters
            continue
        if key not in known:
            raise ValueError(f"unknown config key {key!r}; known: {sorted(known)}")
        data[key] = _parse_value(value)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
    data["adapters"] = tuple(data.get("adapters", ()))
    return TrainConfig(**data)


def _renamed(data: dict) -> dict:
    for old, new in RENAMED.items():
        if old in data:
            if new in data:
                raise ValueError(f"config sets both {old!r} and {new!r}: {old!r} is the old name of {new!r}; keep one")
            data[new] = data.pop(old)
    return data


def upgrade_saved_config(d: dict) -> dict:
    """A config dict saved before a rename (checkpoints' resume keys), in today's field names."""
    d = dict(d)
    if "adapter_prompts_per_step" in d:
        per_adapter = d.pop("adapter_prompts_per_step")
        if per_adapter:
            d["prompts_per_step"] = list(per_adapter)
    if "seed" in d and "data_seed" not in d:
        d["data_seed"] = d.pop("seed")
    return d


def save_config(cfg: TrainConfig, path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2, default=str))


def replace(cfg: TrainConfig, **changes) -> TrainConfig:
    return dataclasses.replace(cfg, **changes)
