"""Save and load adapters in PEFT's on-disk format (``adapter_config.json`` + safetensors).

Key names follow PEFT: ``base_model.model.<module path>.lora_A.weight`` ([r, K]) and
``...lora_B.weight`` ([N, r]). Only safetensors are read, never pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_engine.adapters import AdapterSpec

PREFIX = "base_model.model."


def save_adapter(engine, i: int, directory, base_model_name: str | None = None) -> Path:
    """Write adapter ``i`` of ``engine`` as a PEFT LoRA adapter directory."""
    spec = engine.adapter_spec(i)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    modules = set()
    for name, p in engine.bank.named_parameters_of(i).items():
        module, which = name.rsplit(".", 1)
        modules.add(module.split(".")[-1])
        tensors[f"{PREFIX}{module}.{which}.weight"] = p.detach().to("cpu").contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.scaling == "rslora",
        "target_modules": sorted(modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": False,
        "lora_engine": spec.to_dict(),
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_adapter(engine, directory) -> int:
    """Add the PEFT LoRA adapter in ``directory`` to ``engine``'s bank; returns its id."""
    directory = Path(directory)
    cfg_path, w_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not cfg_path.exists() or not w_path.exists():
        raise ValueError(f"{directory} must hold adapter_config.json and adapter_model.safetensors "
                         "(only safetensors are read)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{directory}: peft_type {cfg.get('peft_type')!r} is not LORA")
    ours = cfg.get("lora_engine")
    if ours:
        spec = AdapterSpec(**{**ours, "target_modules": tuple(ours["target_modules"])
                              if isinstance(ours.get("target_modules"), list) else ours.get("target_modules")})
    else:
        spec = AdapterSpec(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                           scaling="rslora" if cfg.get("use_rslora") else "lora",
                           target_modules=tuple(cfg["target_modules"]) if isinstance(cfg["target_modules"], list)
                           else cfg["target_modules"])
    i = engine.add_adapter(spec)
    try:
        load_adapter_weights(engine, i, directory)
    except ValueError:
        engine.remove_adapter(i)
        raise
    return i


def load_adapter_weights(engine, i: int, directory) -> None:
    """Copy the PEFT adapter weights in ``directory`` into the existing adapter ``i``."""
    directory = Path(directory)
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    params = engine.bank.named_parameters_of(i)
    expected = {f"{PREFIX}{name}.weight": name for name in params}
    missing = [k for k in expected if k not in tensors]
    unknown = [k for k in tensors if k not in expected]
    if missing or unknown:
        raise ValueError(f"{directory}: adapter modules do not match the base model "
                         f"(missing {missing[:3]}, unknown {unknown[:3]}): load it on the base it was "
                         "trained on, with the same target modules")
    with torch.no_grad():
        for key, name in expected.items():
            p = params[name]
            if tensors[key].shape != p.shape:
                raise ValueError(f"{key}: shape {tuple(tensors[key].shape)} != {tuple(p.shape)} "
                                 "expected by this base model")
            p.copy_(tensors[key])
