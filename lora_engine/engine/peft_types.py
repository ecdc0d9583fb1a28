"""PEFT's config types beyond LoRA and VeRA, read back into an ``AdapterSpec`` (``peft_format``
uses these for a directory PEFT itself wrote): AdaLoRA, MiSS, IA3 and LayerNorm tuning.

    peft_type   tensors (after base_model.model.<module>.)             spec
    ADALORA     lora_A [r, K], lora_E [r, 1], lora_B [N, r]              rank=init_r, alpha=lora_alpha, adalora=...
    MISS        miss_block [r, N] (init_weights=True only)             rank=r
    IA3         ia3_l [N, 1] (output) or [1, K] (feedforward input)    feedforward_modules=...
    LN_TUNING   ln_tuning_layers.weight [d] (+ .bias)                  on the norm modules
"""
from __future__ import annotations

from lora_engine.engine.spec import AdapterSpec

TYPES = ("ADALORA", "MISS", "IA3", "LN_TUNING")
# Tensor suffixes of these types (``peft_format._KEY`` adds them to LoRA's and VeRA's).
KEY_KINDS = r"lora_A|lora_B|lora_E|miss_block|ia3_l|ln_tuning_layers\.weight|ln_tuning_layers\.bias"
COMPLETE = ({"lora_A", "lora_B", "lora_E"}, {"miss_block"}, {"ia3_l"}, {"ln_tuning_layers"})


def spec_for(cfg: dict, modules: list[str], directory) -> AdapterSpec:
    """The ``AdapterSpec`` of a PEFT config of one of ``TYPES`` on exactly ``modules``."""
    kind, targets = cfg["peft_type"], tuple(modules)
    if kind == "MISS":
        if cfg.get("init_weights", True) is not True:
            raise ValueError(f"{directory}: MiSS init_weights={cfg['init_weights']!r} (bat/mini) is not supported: "
                             "only PEFT's default MiSS form (init_weights=True) loads")
        return AdapterSpec(rank=int(cfg["r"]), method="miss", target_modules=targets)
    if kind == "IA3":
        ff = cfg.get("feedforward_modules") or ()
        return AdapterSpec(rank=1, method="ia3", target_modules=targets,
                           feedforward_modules=ff if isinstance(ff, str) else tuple(ff))
    if kind == "LN_TUNING":
        return AdapterSpec(rank=1, method="ln_tuning", target_modules=targets)
    schedule = {"target_r": cfg.get("target_r", 8), "tinit": cfg.get("tinit", 0), "tfinal": cfg.get("tfinal", 0),
                "delta_t": cfg.get("deltaT", 1), "beta1": cfg.get("beta1", 0.85), "beta2": cfg.get("beta2", 0.85),
                "orth_reg_weight": cfg.get("orth_reg_weight", 0.5), "total_step": cfg.get("total_step")}
    return AdapterSpec(rank=int(cfg.get("init_r", 12)), alpha=float(cfg.get("lora_alpha", 8)), method="adalora",
                       target_modules=targets, adalora=schedule)
