"""Base models by name: the built-in tiny default or a local Hugging Face folder (no hub downloads).

The one place that turns a ``model = ...`` string into a frozen model and its tokenizer, for the
trainer, the sweep, the spectrum analysis and the client.
"""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> str:
    """``"auto"``: CUDA when available, else the CPU; anything else as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``"auto"``: bf16 on CUDA (the fp32 dot path runs at ~1/15 of bf16's speed there), fp32 on a CPU."""
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def model_path(model: str, progress: bool = True) -> str:
    """The local folder of ``model``: ``"tiny"`` (built once and cached) or an existing path."""
    if model == "tiny":
        from lora_engine.rl.tiny_model import build_tiny_model
        return build_tiny_model(progress=progress)
    if not Path(model).exists():
        raise ValueError(f"model {model!r} is neither 'tiny' nor a local directory: give the path of a "
                         "saved Hugging Face model (no hub downloads)")
    return str(model)


def load_base(model: str, dtype: str = "auto", device: str = "auto", progress: bool = True):
    """(model in eval mode on ``device``, tokenizer with a pad token) for ``model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = model_path(model, progress=progress)
    device = resolve_device(device)
    net = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return net.to(device).eval(), tokenizer
