"""Rollouts: the sampler never returns a zero-probability token, sampling log-probs in fp32 from
hidden states, the cache argument of either transformers API, several stop tokens, and a cap on
sequences per decoding batch that leaves every sample unchanged; the same two fixes in the
server's sampler."""
import warnings

import pytest
import torch

import lora_engine as le
from helpers import assert_close
from lora_engine.rl import rollout
from lora_engine.rl.rollout import _sample, cache_kwarg, draw_uniforms, generate, inverse_cdf
from models import randomize_b, tiny_model


@pytest.mark.parametrize("probs, u, want", [
    pytest.param([0.0, 0.5, 0.0, 0.5], 0.0, 1, id="u0-leading-zero"),
    pytest.param([0.0, 0.0, 0.0, 1.0], 0.0, 3, id="u0-all-but-last-zero"),
    pytest.param([0.25, 0.25, 0.0, 0.5], 0.5, 1, id="tie-keeps-the-left-nonzero-entry"),
    pytest.param([0.0, 0.0, 0.25, 0.75], 0.0, 2, id="u0-two-leading-zeros"),
    pytest.param([0.5, 0.5, 0.0, 0.0], 1.0, 1, id="u1-rounds-to-the-total"),
    pytest.param([0.5, 0.5, 0.0, 0.0], 0.9999999, 1, id="just-below-1"),
])
def test_inverse_cdf_never_returns_a_zero_probability_token(probs, u, want):
    got = inverse_cdf(torch.tensor([probs]), torch.tensor([u]))
    assert got.tolist() == [want] and probs[want] > 0


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_samples_stay_in_the_support(top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    logits[:, ::3] = -float("inf")  # a third of the vocabulary has probability exactly 0
    logits[0, 0] = 5.0  # ... except one entry of row 0
    u = torch.rand(64, generator=g)
    u[:8] = 0.0
    tok = _sample(logits, 1.0, top_p, u)
    probs = torch.softmax(logits, -1)
    assert bool((probs.gather(1, tok[:, None]) > 0).all())
    if top_p < 1:  # and inside the nucleus: the smallest set of top tokens reaching top_p
        sp, _ = probs.sort(-1, descending=True)
        kept = ((sp.cumsum(-1) - sp) < top_p).sum(-1)
        rank = (probs > probs.gather(1, tok[:, None])).sum(-1)
        assert bool((rank < kept).all())


def test_uniforms_are_per_step_draws_of_each_adapter():
    ids, seeds, T = [0, 1, 0, 2, 1, 0], {0: 5, 1: 6, 2: 7}, 4
    u = draw_uniforms(ids, seeds, T)
    for a, s in seeds.items():
        rows = [b for b, x in enumerate(ids) if x == a]
        g = torch.Generator().manual_seed(s)
        want = torch.stack([torch.rand(len(rows), generator=g) for _ in range(T)], 1)
        assert torch.equal(u[rows], want)


def _engine(dtype=torch.float32, family="llama"):
    engine = le.MultiLoRAModel(tiny_model(family, dtype=dtype), [le.AdapterSpec(rank=r, seed=r) for r in (1, 2, 4)])
    randomize_b(engine, std=0.2)
    return engine


PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [3, 4], [14, 15], [16], [17, 18, 19], [20, 21]]
OWNERS = [0, 0, 1, 2, 1, 0, 2, -1]


@pytest.mark.parametrize("max_batch", [1, 3, 5, 100])
def test_decoding_in_chunks_gives_the_same_samples(max_batch):
    engine = _engine()
    kw = dict(eos_id=[1, 2], pad_id=0, max_new_tokens=6, temperature=0.9, top_p=0.95,
              seeds={0: 11, 1: 12, 2: 13, -1: 14})
    whole = generate(engine, PROMPTS, OWNERS, **kw)
    parts = generate(engine, PROMPTS, OWNERS, max_batch=max_batch, **kw)
    for name in ("input_ids", "attention_mask", "completion_ids", "completion_mask", "truncated", "adapter_ids",
                 "prompt_tokens"):
        assert torch.equal(getattr(parts, name), getattr(whole, name)), name
    assert parts.prompt_len == whole.prompt_len
    assert_close(parts.sampling_logp, whole.sampling_logp, torch.float32, "sampling log-probs")


def test_trainer_rollout_batch_size_changes_memory_not_samples(tmp_path):
    from test_trainer import _trainer

    whole = _trainer(tmp_path / "a").rollout(0)[2]
    capped = _trainer(tmp_path / "b", rollout_batch_size=3).rollout(0)[2]
    assert torch.equal(whole.completion_ids, capped.completion_ids)
    assert torch.equal(whole.completion_mask, capped.completion_mask)


def test_sampling_logp_in_fp32_from_hidden_states(monkeypatch):
    """bf16 model: the sampled token's log-prob is computed from the hidden state and LM head in
    fp32 (what the trainer recomputes), not from logits rounded to bf16."""
    engine = _engine(torch.bfloat16)
    with torch.no_grad():
        engine.model.get_output_embeddings().weight.mul_(40)  # logits ~ +-10: bf16 rounding shows
    seen, real = [], rollout.ops.token_logprobs

    def spy(h, w, t, **kw):
        out = real(h, w, t, **kw)
        seen.append((h.clone(), w, t.clone(), kw["temperature"], out.clone()))
        return out

    monkeypatch.setattr(rollout.ops, "token_logprobs", spy)
    ro = generate(engine, PROMPTS, OWNERS, eos_id=1, pad_id=0, max_new_tokens=4, temperature=0.8,
                  seeds={0: 1, 1: 2, 2: 3, -1: 4})
    assert seen and all(h.dtype == torch.bfloat16 for h, *_ in seen)
    ours, rounded = 0.0, 0.0
    for step, (h, w, t, temp, out) in enumerate(seen):
        exact = torch.log_softmax(h.double() @ w.double().T / temp, -1).gather(1, t[:, None]).squeeze(1)
        bf16 = torch.log_softmax((h @ w.T).float() / temp, -1).gather(1, t[:, None]).squeeze(1).double()
        assert out.dtype == torch.float32
        live = ro.completion_mask[:, step].bool()
        assert torch.equal(ro.sampling_logp[live, step], out[live])
        ours = max(ours, float((out.double() - exact).abs().max()))
        rounded = max(rounded, float((bf16 - exact).abs().max()))
    assert ours < 1e-4 and rounded > 20 * ours, (ours, rounded)


class _OldAPIDecoder(torch.nn.Module):
    """A decoder as transformers <= 5.17 has it: the KV cache comes as ``past_key_values``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, **{cache_kwarg(self.inner): past_key_values})


def test_cache_argument_for_old_and_new_transformers():
    engine = _engine()
    kw = dict(eos_id=1, pad_id=0, max_new_tokens=5, temperature=1.0, seeds={0: 1, 1: 2, 2: 3, -1: 4})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = generate(engine, PROMPTS, OWNERS, **kw)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert cache_kwarg(engine.model.model) in ("cache", "past_key_values")  # whichever is installed
    engine.model.model = _OldAPIDecoder(engine.model.model)
    assert cache_kwarg(engine.model.model) == "past_key_values"
    old = generate(engine, PROMPTS, OWNERS, **kw)
    assert torch.equal(old.completion_ids, new.completion_ids)


def test_stops_on_any_of_several_tokens():
    engine = _engine()
    first = generate(engine, PROMPTS, OWNERS, eos_id=1, pad_id=0, max_new_tokens=3, greedy=True).completion_ids[:, 0]
    ro = generate(engine, PROMPTS, OWNERS, eos_id=[1, int(first[0]), int(first[2])], pad_id=0, max_new_tokens=3,
                  greedy=True)
    for b in (0, 2):
        assert ro.completion_mask[b].tolist() == [1, 0, 0][:ro.completion_mask.shape[1]] and not ro.truncated[b]
    with pytest.raises(ValueError, match="eos_id is empty"):
        generate(engine, PROMPTS, OWNERS, eos_id=[], pad_id=0, max_new_tokens=2, greedy=True)
    with pytest.raises(ValueError, match="max_batch"):
        generate(engine, PROMPTS, OWNERS, eos_id=1, pad_id=0, max_new_tokens=2, greedy=True, max_batch=-1)


def test_server_sampler_takes_the_cache_argument_and_no_zero_probability_token(monkeypatch):
    """The Tinker server's decoder: no deprecated ``past_key_values`` call, and at u = 0 (the flat
    start of every top-k = 1 cdf) the one token with probability > 0, i.e. the greedy one."""
    from lora_engine.interop.server.sampler import Request, decode

    engine = _engine()

    def requests(**kw):
        return [Request(adapter_id=a, prompt=p, n=1, max_tokens=4, **kw) for p, a in zip(PROMPTS, OWNERS)]

    greedy = decode(engine, requests(temperature=0.0), pad_id=0)
    rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *size, **kw: rand(*size, **kw) * 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        top1 = decode(engine, requests(top_k=1), pad_id=0)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    assert [[s[0] for s in r] for r in top1] == [[s[0] for s in r] for r in greedy]
