"""Tiny random-weight Hugging Face causal LMs for tests (no hub)."""
import torch
import transformers

FAMILIES = ("qwen3", "llama", "qwen2")


def tiny_config(family: str, vocab: int = 97):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=16, **common)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    raise ValueError(family)


def tiny_model(family: str = "qwen3", seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    return model


def randomize_b(engine, seed: int = 0, std: float = 0.05):
    """LoRA B starts at zero (the update is a no-op); tests need a non-trivial adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in engine.adapter_ids:
            for name, p in engine.bank.named_parameters_of(i).items():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * std)
