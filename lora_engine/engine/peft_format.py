"""Save and load adapters in PEFT's on-disk format (``adapter_config.json`` + safetensors).

A directory written here loads with ``peft.PeftModel.from_pretrained(base, dir)`` and, for the
LoRA family, serves as a vLLM ``LoRARequest`` path; a directory written by PEFT's
``save_pretrained`` loads into an engine's bank. Tensors carry PEFT 0.21's key names (adapter
name stripped), from ``peft_state_dict_for`` and each method's ``to_peft`` (``methods.TABLE``):

    base_model.model.<module>.lora_A.weight    [r, K]
    base_model.model.<module>.lora_B.weight    [N, r]
        (e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)
    base_model.model.<module>.lora_magnitude_vector  [N]         DoRA
    base_model.model.<module>.vera_lambda_{d,b}       [r], [N]   VeRA (+ base_model.vera_A / vera_B)

PiSSA/MiLoRA are written as PEFT's converted LoRA (rank 2r, on the original base), which loads
back exactly. ``adapter_config.json`` holds only fields of PEFT's config class
(``LoraConfig(**cfg)`` and vLLM's ``PEFTHelper`` accept it). What PEFT has no field for (seed,
learning rate, LoRA+ ratio, name...) goes to a sidecar ``lora_engine.json`` that PEFT and vLLM
never read; directories from before the sidecar, with a ``"lora_engine"`` key inside the config,
still load. ``method="full"`` has no PEFT form: its directory holds the dense updates
(``base_model.model.<module>.delta_weight``) and the sidecar, no ``adapter_config.json``.

Only safetensors are read, never pickle (``adapter_model.bin`` is refused).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lora_engine.atomic import write_atomic
from lora_engine.engine import peft_types
from lora_engine.engine.methods import method_of
from lora_engine.engine.spec import TARGET_GROUPS, AdapterSpec

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SIDECAR_FILE = "lora_engine.json"
# Per-module tensors of a PEFT LoRA / VeRA state dict, and the shared VeRA projections.
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|"
                  r"lora_magnitude_vector|vera_lambda_d|vera_lambda_b|" + peft_types.KEY_KINDS + r")$")
_SHARED = ("base_model.vera_A", "base_model.vera_B")
# PEFT inits that change the base weights (the adapter then expects that residual base).
_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")

# PEFT features the bank cannot represent: (config field, is it set?, how to fix).
_UNSUPPORTED = (
    ("bias", lambda v: v not in (None, "none"), "LoRA bias terms are not supported; use bias='none'"),
    ("lora_bias", bool, "lora_bias is not supported; use lora_bias=False"),
    ("modules_to_save", bool, "modules_to_save (fully trained extra modules) is not supported; "
                              "save those modules separately"),
    ("fan_in_fan_out", bool, "fan_in_fan_out (GPT-2 Conv1D layers) is not supported"),
    ("layer_replication", bool, "layer_replication is not supported"),
    ("trainable_token_indices", bool, "trainable_token_indices is not supported"),
    ("target_parameters", bool, "target_parameters (LoRA on raw parameters, e.g. MoE experts) is not supported"),
    ("alora_invocation_tokens", bool, "activated LoRA (alora_invocation_tokens) is not supported"),
    ("init_lora_weights", lambda v: v is not None and v not in _SAFE_INITS,
     "this adapter was initialised by changing the base weights (PiSSA/OLoRA/CorDA/LoftQ...), so it only "
     "fits that modified base: re-save it converted, save_pretrained(..., "
     "path_initial_model_for_weight_conversion=...)"),
)


def _ints(x):
    """Integral floats as ints, recursively: vLLM's PEFTHelper types lora_alpha as an int."""
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, dict):
        return {k: _ints(v) for k, v in x.items()}
    return x


# --- save ------------------------------------------------------------------------------------

def save_adapter(engine, i: int, directory, base_model_name: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write adapter ``i`` of ``engine`` as a PEFT adapter directory.

    Args:
        engine: a ``MultiLoRAModel``.
        i: adapter id.
        directory: created if missing; files of the same names are replaced.
        base_model_name: recorded as ``base_model_name_or_path`` (PEFT and vLLM read it).
        dtype: tensor dtype on disk; None keeps the adapter's own (fp32 master weights).

    Returns: the directory, holding ``adapter_config.json``, ``adapter_model.safetensors`` and
    ``lora_engine.json``; each is written under a temporary name and then renamed, so a crash
    never leaves a half-written file under the final name.
    """
    spec = engine.adapter_spec(i)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if method_of(spec).peft_config is None:
        tensors = {f"{PREFIX}{name}": p.detach().to("cpu").contiguous()
                   for name, p in engine.bank.named_parameters_of(i).items()}
        config = None
    else:
        tensors = peft_state_dict_for(engine, i)
        config = _ints({**peft_config_for(spec, engine.bank.modules_of(i)),
                        "base_model_name_or_path": base_model_name})
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    write_atomic(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    if config is not None:
        write_atomic(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2)))
    else:
        (directory / CONFIG_FILE).unlink(missing_ok=True)
    sidecar = {"format": 1, "spec": spec.to_dict()}
    write_atomic(directory / SIDECAR_FILE, lambda p: p.write_text(json.dumps(sidecar, indent=2)))
    return directory


# --- read ------------------------------------------------------------------------------------

def read_tensors(directory) -> dict[str, torch.Tensor]:
    """``adapter_model.safetensors`` of ``directory`` (CPU tensors); never a pickle file."""
    directory = Path(directory)
    w_path = directory / WEIGHTS_FILE
    if not w_path.exists():
        if (directory / "adapter_model.bin").exists():
            raise ValueError(f"{directory} holds adapter_model.bin (pickle), which is never read here: "
                             "re-save it with safetensors (PEFT: save_pretrained(..., safe_serialization=True))")
        raise ValueError(f"{directory} has no {WEIGHTS_FILE}: pass a PEFT adapter directory")
    with safe_open(str(w_path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_spec(directory) -> AdapterSpec | None:
    """The ``AdapterSpec`` lora-engine saved with the adapter (sidecar, or the old in-config
    ``"lora_engine"`` key); None for a directory written by PEFT itself."""
    directory = Path(directory)
    sidecar, cfg_path = directory / SIDECAR_FILE, directory / CONFIG_FILE
    if sidecar.exists():
        ours = json.loads(sidecar.read_text())["spec"]
    elif cfg_path.exists():
        ours = json.loads(cfg_path.read_text()).get("lora_engine")
    else:
        ours = None
    if not ours:
        return None
    known = {f.name for f in dataclasses.fields(AdapterSpec)}
    ours = {k: (tuple(v) if k in ("target_modules", "layers") and isinstance(v, list) else v)
            for k, v in ours.items() if k in known}
    return AdapterSpec(**ours)


def read_config(directory) -> dict:
    """``adapter_config.json`` of a PEFT LoRA or VeRA directory, checked for features the bank lacks.

    Raises ``ValueError`` (naming the fix) for other PEFT types, bias terms, ``modules_to_save``,
    Conv1D layouts, inits that changed the base weights (unconverted PiSSA/OLoRA/LoftQ...) and
    the rarer PEFT features listed in ``_UNSUPPORTED``. Per-module ranks and alphas
    (``rank_pattern``/``alpha_pattern``), rsLoRA, DoRA and ``layers_to_transform`` are supported.
    """
    directory = Path(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.exists():
        raise ValueError(f"{directory} has no {CONFIG_FILE}: pass a PEFT adapter directory "
                         f"(adapter_config.json + {WEIGHTS_FILE})")
    cfg = json.loads(cfg_path.read_text())
    kind = cfg.get("peft_type", "LORA")
    if kind not in ("LORA", "VERA") + peft_types.TYPES:
        raise ValueError(f"{directory}: peft_type {cfg.get('peft_type')!r} is not supported: LoRA (incl. rsLoRA, "
                         "DoRA), VeRA, AdaLoRA, MiSS, IA3 and LN tuning adapters load")
    for name, is_set, fix in _UNSUPPORTED:
        if is_set(cfg.get(name)):
            raise ValueError(f"{directory}: {name}={cfg.get(name)!r}: {fix}")
    if kind in ("LORA", "VERA", "MISS") and (not isinstance(cfg.get("r"), int) or cfg["r"] < 1):
        raise ValueError(f"{directory}: adapter_config.json needs an int r >= 1, got {cfg.get('r')!r}")
    if cfg.get("peft_type", "LORA") == "LORA" and cfg.get("lora_alpha") is None:
        raise ValueError(f"{directory}: adapter_config.json needs lora_alpha")
    return cfg


def _modules_of(tensors: dict[str, torch.Tensor], directory) -> list[str]:
    """Module paths (relative to the HF model) of a PEFT state dict; every key must be known."""
    found: dict[str, set] = {}
    for k in tensors:
        if k in _SHARED:
            continue
        m = _KEY.match(k)
        if m is None:
            raise ValueError(f"{directory}: tensor {k!r} is not a LoRA/DoRA/VeRA weight of a linear layer "
                             f"({PREFIX}<module>.lora_A.weight, ...); embedding LoRA and bias terms are "
                             "not supported")
        found.setdefault(m["module"], set()).add(m["kind"].split(".")[0])
    for mod, kinds in found.items():
        if not any(need <= kinds for need in ({"lora_A", "lora_B"}, {"vera_lambda_d", "vera_lambda_b"})
                   + peft_types.COMPLETE):
            raise ValueError(f"{directory}: module {mod} has only {sorted(kinds)}; the file is incomplete")
    return sorted(found)


def _spec_for_peft(cfg: dict, modules: list[str]) -> AdapterSpec:
    """An ``AdapterSpec`` equal to a PEFT-made adapter's config, on exactly ``modules``.

    The tensors, not ``target_modules``, decide the modules: PEFT skips target names that match
    nothing and applies ``layers_to_transform`` before saving.
    """
    targets = tuple(modules)
    if cfg.get("peft_type") in peft_types.TYPES:
        return peft_types.spec_for(cfg, modules, "PEFT config")
    if cfg.get("peft_type") == "VERA":
        return AdapterSpec(rank=int(cfg["r"]), method="vera", target_modules=targets,
                           projection_prng_key=int(cfg.get("projection_prng_key", 0)),
                           d_initial=float(cfg.get("d_initial", 0.1)))
    return AdapterSpec(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                       scaling="rslora" if cfg.get("use_rslora") else "lora",
                       method="dora" if cfg.get("use_dora") else "lora", target_modules=targets,
                       rank_pattern=dict(cfg.get("rank_pattern") or {}) or None,
                       alpha_pattern={k: float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()} or None)


# --- load ------------------------------------------------------------------------------------

def load_adapter(engine, directory) -> int:
    """Add the adapter in ``directory`` to ``engine``'s bank; returns its id.

    A directory saved by lora-engine comes back with its full ``AdapterSpec`` (any method); a
    PEFT-made one (LoRA, rsLoRA, DoRA, per-module ranks/alphas, VeRA) gets the spec its config
    describes, on exactly the modules its tensors cover.

    Raises:
        ValueError: unsupported PEFT features (``read_config``), a module the engine does not
            wrap (an unknown target, or a base of another architecture), or tensors that do not
            fit this base (another model size). On error the bank is left unchanged.
    """
    directory = Path(directory)
    spec = read_spec(directory)
    cfg = read_config(directory) if spec is None else None
    tensors = read_tensors(directory)
    if spec is not None and method_of(spec).peft_config is None:
        modules = sorted({k[len(PREFIX):].rsplit(".", 1)[0] for k in tensors if k.startswith(PREFIX)})
    else:
        modules = _modules_of(tensors, directory)
    if (spec is not None and method_of(spec).module_type == "norm") or (cfg or {}).get("peft_type") == "LN_TUNING":
        engine.wrap_norms()
    wrapped = engine.bank.modules_info
    unknown = [m for m in modules if m not in wrapped]
    if unknown:
        raise ValueError(f"{directory}: target module(s) {unknown[:3]} are not LoRA-wrapped linears of this "
                         f"engine (wrapped e.g. {list(wrapped)[:3]}): build the engine on the base model the "
                         "adapter was trained on, with target_modules covering them (e.g. 'all-linear'); "
                         "lm_head and embeddings are never adapted")
    if spec is None:
        spec = _spec_for_peft(cfg, modules)
    elif sorted(engine.bank.targets_of(spec)) != modules:
        # The saved targets may be relative to another engine's defaults ("all-linear" on an
        # engine that wrapped fewer modules): the modules in the file are what must be adapted.
        spec = dataclasses.replace(spec, target_modules=tuple(modules), layers=None)
    i = engine.add_adapter(spec)
    try:
        load_adapter_weights(engine, i, directory, tensors)
    except ValueError:
        engine.remove_adapter(i)
        raise
    return i


def load_adapter_weights(engine, i: int, directory, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Copy the adapter tensors in ``directory`` into the existing adapter ``i`` (the trainer's
    resume path). ``tensors``: already read from ``directory``."""
    directory = Path(directory)
    tensors = read_tensors(directory) if tensors is None else tensors
    try:
        load_adapter_state(engine, i, tensors)
    except ValueError as e:
        raise ValueError(f"{directory}: {e} (was the adapter trained on another base model?)") from None


# --- tensors <-> PEFT names ------------------------------------------------------------------

def _no_peft_form(spec):
    return ValueError(f"method {spec.method!r} has no PEFT adapter format: export its dense updates with "
                      "lora_engine.engine.methods.delta_weights(engine, i) (or merge them into the base)")


def _peft_targets(spec, module_names):
    if module_names is not None:
        # Exact names: PEFT matches them as they are, layers already applied.
        return sorted(module_names), None
    t = spec.target_modules
    layers = list(spec.layers) if spec.layers is not None else None
    if t is None or t == "all-linear":
        return "all-linear", layers
    if isinstance(t, str) and t in TARGET_GROUPS:
        # A regex on the parent name would also catch non-Linear children (Qwen3's q_norm).
        raise ValueError(f"target_modules={t!r} has no PEFT spelling without the model: pass "
                         "module_names=engine.bank.modules_of(i)")
    if isinstance(t, str):
        if layers is not None:
            raise ValueError("PEFT ignores layers_to_transform for a regex target_modules: pass "
                             "module_names=engine.bank.modules_of(i) to export the exact modules")
        return t, None
    return list(t), layers


def peft_config_for(spec, module_names=None) -> dict:
    """PEFT ``adapter_config.json`` content for ``spec`` (``peft.get_peft_config`` accepts it).

    ``module_names`` (``engine.bank.modules_of(i)``): export the exact adapted modules rather
    than the spec's patterns. The method's own fields come from its record's ``peft_config``
    (PiSSA/MiLoRA: PEFT's own PiSSA-to-LoRA conversion, a rank-2r LoRA on the *original* base).
    LoRA+, LoRA-FA and rsLoRA are LoRA adapters (their difference is in training). A method
    without a PEFT form (``full``): ValueError.
    """
    method = method_of(spec)
    if method.peft_config is None:
        raise _no_peft_form(spec)
    targets, layers = _peft_targets(spec, module_names)
    if layers is not None and "layers_to_transform" not in method.peft_fields:
        raise ValueError(f"PEFT's {spec.method} config has no layers_to_transform: pass "
                         "module_names=engine.bank.modules_of(i) to export the exact modules")
    common = {"task_type": "CAUSAL_LM", "target_modules": targets, "inference_mode": False,
              **{k: v for k, v in (("layers_to_transform", layers), ("fan_in_fan_out", False), ("bias", "none"))
                 if k in method.peft_fields}}
    own = method.peft_config(spec, targets)
    if own["peft_type"] == "LORA":
        own = {**own, "use_rslora": spec.scaling == "rslora", "lora_dropout": 0.0, "init_lora_weights": True}
    return {**own, **common}


def peft_state_dict_for(engine, i: int) -> dict[str, torch.Tensor]:
    """Adapter ``i``'s tensors under PEFT's key names (CPU, contiguous), to go with ``peft_config_for``.

    LoRA family: ``base_model.model.<module>.lora_A.weight`` [r, K], ``.lora_B.weight`` [N, r];
    DoRA adds ``.lora_magnitude_vector`` [N]; PiSSA/MiLoRA: the rank-2r LoRA [A; A0], [B, -B0];
    VeRA: ``.vera_lambda_d`` [r], ``.vera_lambda_b`` [N] and the shared ``base_model.vera_A``
    [r, K_max] / ``base_model.vera_B`` [N_max, r].
    """
    spec = engine.adapter_spec(i)
    method = method_of(spec)
    if method.to_peft is None:
        raise _no_peft_form(spec)
    bank = engine.bank
    out = {}
    for name in bank.modules_of(i):
        t = {k: v.detach() for k, v in bank.tensors(i, name).items()}
        out.update({f"{PREFIX}{name}.{suffix}": v for suffix, v in method.to_peft(t).items()})
    if method.shared_projection:
        out["base_model.vera_A"], out["base_model.vera_B"] = bank.vera_of(i)
    return {k: v.to("cpu").contiguous() for k, v in out.items()}


def load_adapter_state(engine, i: int, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into adapter ``i``: keys as ``engine.bank.named_parameters_of(i)`` names
    (bare, or ``base_model.model.<name>`` with or without ``.weight``, as ``save_adapter`` writes
    them), or PEFT's (``peft_state_dict_for``; each method's ``from_peft`` maps them back, e.g. a
    PiSSA/MiLoRA rank-2r LoRA split into A, A0, B, B0).
    """
    spec = engine.adapter_spec(i)
    method = method_of(spec)
    bank = engine.bank
    params = bank.named_parameters_of(i)
    found = {}
    for key, v in tensors.items():
        bare = key[len(PREFIX):] if key.startswith(PREFIX) else key
        # No tensor kind is called "weight": a trailing ".weight" is always PEFT's nn.Linear suffix.
        found[bare[:-len(".weight")] if bare.endswith(".weight") else bare] = (key, v)
    if method.shared_projection:
        for which, ref in zip(("vera_A", "vera_B"), bank.vera_of(i)):
            got = found.pop(f"base_model.{which}", found.pop(which, None))
            # Compared in the file's dtype: a checkpoint may be saved in bf16.
            if got is not None and (got[1].shape != ref.shape or not torch.equal(got[1], ref.to(got[1]))):
                raise ValueError(f"saved {which} differs from this bank's projection: use the same rank, "
                                 "projection_prng_key and target modules as the run that saved it")
    if method.from_peft is not None:
        for name in bank.modules_of(i):
            method.from_peft(found, name, spec.rank_for(name))
    missing = sorted(set(params) - set(found))
    unknown = sorted(found[n][0] for n in set(found) - set(params))
    if missing or unknown:
        raise ValueError(f"saved adapter does not match adapter {i} ({spec.method}): missing {missing[:3]}, "
                         f"unknown {unknown[:3]}; load it with the spec and target modules it was trained with")
    with torch.no_grad():
        for name, p in params.items():
            key, v = found[name]
            if v.shape != p.shape:
                raise ValueError(f"{key}: shape {tuple(v.shape)} != {tuple(p.shape)} expected by this base "
                                 "model and spec (rank_pattern / target modules differ?)")
            p.copy_(v)
