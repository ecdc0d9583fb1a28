"""The Tinker-style client: queued work of several handles runs as ONE base forward with the
gradients of separate calls, the losses' formulas, sampling log-probs, steps, state, errors, example."""
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from helpers import assert_as_close_as_torch, assert_close
from lora_engine import ops as le_ops
from lora_engine.interop.client import Batch, Client
from models import tiny_model

V, EOS, PAD = 97, 2, 0


def _client(seed=0):
    # Two projections per layer keep the CPU cost of the reference LoRA path low.
    client = Client(tiny_model("qwen3", seed), eos_id=EOS, pad_id=PAD, target_modules=["q_proj", "v_proj"])
    a = client.create_adapter(rank=2, alpha=8, seed=0)
    b = client.create_adapter(rank=8, alpha=16, seed=1, scaling="rslora")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B starts at zero; a non-trivial adapter gives A a gradient too
        for h in (a, b):
            for name, p in client.engine.bank.named_parameters_of(h.id).items():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return client, a, b


def _batch(B, P, C, seed, noise=0.3):
    """Random prompts/completions of uneven lengths; sampling log-probs off by noise (clipping hit)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, V, (P - (k % 2),), generator=g).tolist() for k in range(B)]
    completions = [torch.randint(3, V, (max(C - k, 1),), generator=g).tolist() for k in range(B)]
    logps = [(-2.0 + noise * torch.randn(len(c), generator=g)).tolist() for c in completions]
    return Batch.from_sequences(prompts, completions, logps, advantages=torch.randn(B, generator=g),
                                rewards=torch.rand(B, generator=g), group_ids=[k // 2 for k in range(B)],
                                pad_id=PAD)


def _callable_loss(logp, batch):
    return -(logp * batch.weights).sum() / batch.weights.sum()


LOSSES = [pytest.param("importance_sampling", id="is"), pytest.param("ppo", id="ppo"),
          pytest.param("grpo", id="grpo"), pytest.param(_callable_loss, id="callable")]


def _count_base_forwards(client):
    calls = []
    decoder = client.engine.model.model
    decoder.register_forward_hook(lambda *args: calls.append(1))
    return calls


def _grads_of(params):
    return torch.cat([p.grad.flatten() for p in params])


def _grads(handle):
    return _grads_of(handle.parameters())


@pytest.mark.parametrize("loss", LOSSES)
def test_queued_handles_share_one_base_forward_with_separate_gradients(loss):
    ba, bb = _batch(4, 5, 6, seed=1), _batch(3, 7, 4, seed=2)

    client, a, b = _client()
    calls = _count_base_forwards(client)
    fa, fb = a.forward_backward(ba, loss), b.forward_backward(bb, loss)
    assert calls == [] and not fa.done, "forward_backward must only queue"
    client.flush()
    assert len(calls) == 1 and fa.done and fb.done
    together = [(fa.result(), _grads(a)), (fb.result(), _grads(b))]

    client2, a2, b2 = _client()
    calls2 = _count_base_forwards(client2)
    alone = []
    for h, batch in ((a2, ba), (b2, bb)):
        out = h.forward_backward(batch, loss).result()
        alone.append((out, _grads(h)))
    assert len(calls2) == 2
    for (o1, g1), (o2, g2), name in zip(together, alone, "ab"):
        assert_close(torch.tensor(o1.loss), torch.tensor(o2.loss), torch.float32, f"loss {name}")
        assert_close(o1.logprobs, o2.logprobs, torch.float32, f"logprobs {name}")
        assert_close(g1, g2, torch.float32, f"grads {name}")
        assert float(g1.abs().max()) > 0


def test_optim_step_flushes_the_queue_for_every_handle():
    client, a, b = _client()
    calls = _count_base_forwards(client)
    before_b = [p.detach().clone() for p in b.parameters()]
    fa, fb = a.forward_backward(_batch(2, 4, 3, seed=3)), b.forward_backward(_batch(2, 4, 3, seed=4))
    a.optim_step(lr=1e-2)
    assert len(calls) == 1 and fb.done and all(p.grad is not None for p in b.parameters())
    assert all(torch.equal(x, p) for x, p in zip(before_b, b.parameters())), "a's step moved b"
    b.optim_step(lr=1e-2)
    assert len(calls) == 1 and all(p.grad is None for p in b.parameters())


def test_gradients_after_an_adapter_is_added_between_steps():
    """Adding an adapter lays the buffers out anew: gradients move with their adapters, and a
    handle's next backward (into the new buffers) is seen (the server's flow: a second training
    client created after the first one stepped)."""
    client, a, b = _client()
    a.forward_backward(_batch(2, 4, 3, seed=3)), b.forward_backward(_batch(2, 4, 3, seed=4))
    a.optim_step(lr=1e-2)  # one backward for both, then a's gradient cleared
    kept = _grads(b).clone()
    c = client.create_adapter(rank=3, alpha=6, seed=2)
    assert all(p.grad is None for p in a.parameters()), "a's cleared gradient came back"
    assert torch.equal(_grads(b), kept), "b's gradient did not move with it"
    assert all(p.grad is None or not p.grad.any() for p in c.parameters())
    a.forward_backward(_batch(2, 4, 3, seed=5))
    a.optim_step(lr=1e-2)  # raised "has no gradient" when the new buffers' accumulations went unseen
    assert all(p.grad is None for p in a.parameters())
    assert torch.equal(_grads(b), kept), "a's backward and step touched b's gradient"


def _reference_logp(client, handle, batch):
    """log p(token t | prefix) from the full logits of the model's ordinary forward, fp64."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = client.engine(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                         adapter_ids=torch.full((batch.input_ids.shape[0],), handle.id)).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], 1)


@pytest.fixture(params=["naive", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("loss", ["importance_sampling", "ppo", "grpo"])
def test_loss_formulas(loss, backend):
    """Tinker's definitions, written out independently: sums over weighted tokens (on the Triton
    path too: fractional weights go through the policy-loss kernel as weights)."""
    batch = _batch(5, 4, 6, seed=5)
    batch.weights[1] *= 0.5  # fractional weights count as weights
    client, a, _ = _client()
    out = a.forward_backward(batch, loss, eps_low=0.2, eps_high=0.28).result()
    ours = _grads(a)
    for p in a.parameters():
        p.grad = None
    lp = _reference_logp(client, a, batch)
    w, q = batch.weights.double(), batch.sampling_logprobs.double()
    r = torch.exp(torch.where(w != 0, lp - q, torch.zeros_like(lp)))
    if loss == "grpo":
        adv = torch.zeros(5, dtype=torch.float64)  # a one-sample group has no baseline: advantage 0
        for gid in batch.group_ids.unique():
            sel = batch.group_ids == gid
            rew = batch.rewards[sel].double()
            if sel.sum() > 1:
                adv[sel] = (rew - rew.mean()) / (rew.std() + 1e-4)
    else:
        adv = batch.advantages.double()
    A = adv[:, None]
    per_tok = -r * A if loss == "importance_sampling" else -torch.minimum(r * A, r.clamp(0.8, 1.28) * A)
    expected = (w * per_tok).sum()
    expected.backward()
    assert_close(torch.tensor(out.loss), expected.detach(), torch.float32, "loss")
    assert_close(ours, _grads(a), torch.float32, "grads")
    if loss != "importance_sampling":
        assert 0 < out.metrics["clip_frac"] < 1, "the test must hit the clip region"


def test_sample_logprobs_are_what_forward_recomputes():
    """Samples -> Batch alignment: the recomputed log-probs equal the sampling ones (ratio 1)."""
    client, a, b = _client()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    s = client.sample(prompts, adapter=[a, b, a], n=2, temperature=0.7, max_new_tokens=6)
    assert s.prompt_index == [0, 0, 1, 1, 2, 2] and s.adapters == [a, a, b, b, a, a]
    assert all(len(t) == len(lp) > 0 for t, lp in zip(s.tokens, s.logprobs))
    for h in (a, b):
        batch = s.for_adapter(h).to_batch(advantages=torch.zeros(len(s.for_adapter(h).tokens)))
        out = h.forward_backward(batch, temperature=0.7).result()
        on = batch.weights != 0
        assert_close(out.logprobs[on], batch.sampling_logprobs[on], torch.float32, f"adapter {h.id} logprobs")
        assert abs(out.metrics["ratio_mean"] - 1.0) < 1e-4
    again = client.sample(prompts, adapter=[a, b, a], n=2, temperature=0.7, max_new_tokens=6)
    assert again.tokens != s.tokens, "each call draws new samples"


class _DistinctChars:
    """A task whose reward varies on a random model: distinct characters in the completion."""

    def sample_train(self, n, generator):
        return [{"prompt": f"{a}+{a + 1}=", "answer": ""} for a in torch.randint(0, 50, (n,), generator=generator)]

    def encode_prompt(self, tokenizer, problem):
        return tokenizer(problem["prompt"], add_special_tokens=False)["input_ids"]

    def score(self, problems, completions):
        return [len(set(c)) / 5 for c in completions]


def test_grpo_gradient_equals_the_trainers_on_the_same_rollouts(tmp_path):
    """The lora-client trainer's GRPO (loss_type="grpo": mean over sequences of per-sequence token
    means) is the client's "grpo" with weights 1 / (B * |o_b|): same rollouts, same gradient."""
    from lora_engine.rl.advantages import group_advantages, make_group_ids
    from lora_engine.rl.config import config_from_dict
    from lora_engine.rl.tiny_model import build_tokenizer
    from lora_engine.rl.trainer import GRPOTrainer

    tok = build_tokenizer()
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    spec = {"rank": 4, "alpha": 8, "seed": 3, "target_modules": ["q_proj", "v_proj"]}
    tr = GRPOTrainer(config_from_dict({"adapters": [spec], "prompts_per_step": 3, "samples_per_prompt": 4,
                                       "max_new_tokens": 6, "loss_type": "grpo", "output_dir": str(tmp_path),
                                       "progress": False}), model=model, tokenizer=tok, task=_DistinctChars())
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in tr.engine.adapter_parameters(0):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    problems, prompt_of, ro = tr.rollout(0)
    reward, _ = tr.rewards(problems, ro)
    groups = make_group_ids(ro.adapter_ids, torch.tensor(prompt_of))
    adv, _, _ = group_advantages(reward, groups)
    logp = tr.token_logprobs(ro, ro.adapter_ids)
    losses, _ = le_ops.policy_loss(logp, logp.detach(), adv, ro.completion_mask, ro.adapter_ids, loss_type="grpo")
    losses.sum().backward()
    expected = _grads_of(tr.engine.adapter_parameters(0))

    client = Client(tr.engine.detach(), tok, target_modules=["q_proj", "v_proj"])
    a = client.create_adapter(**{k: v for k, v in spec.items() if k != "target_modules"})
    with torch.no_grad():
        for p, q in zip(a.parameters(), tr.engine.adapter_parameters(0)):
            p.copy_(q)
    n = ro.completion_mask.sum(-1).tolist()
    prompts = [ro.input_ids[b, :ro.prompt_len][ro.attention_mask[b, :ro.prompt_len] == 1].tolist()
               for b in range(len(n))]
    batch = Batch.from_sequences(prompts, [ro.completion_ids[b, :n[b]].tolist() for b in range(len(n))],
                                 [ro.sampling_logp[b, :n[b]].tolist() for b in range(len(n))],
                                 rewards=reward, group_ids=groups, pad_id=tok.pad_token_id)
    batch.weights = batch.weights / (batch.weights.sum(-1, keepdim=True).clamp(min=1) * len(n))
    a.forward_backward(batch, "grpo").result()
    assert_close(_grads_of(a.parameters()), expected, torch.float32, "client grpo vs trainer grpo")


def test_save_and_load_state_continue_identically(tmp_path):
    batches = [_batch(3, 4, 5, seed=s) for s in (6, 7)]
    client, a, _ = _client()
    a.forward_backward(batches[0], "ppo")
    a.optim_step(lr=1e-2, weight_decay=0.1)
    a.save_state(tmp_path / "a")
    a.forward_backward(batches[1], "ppo")
    a.optim_step(lr=1e-2, weight_decay=0.1)
    expected = [p.detach().clone() for p in a.parameters()]

    restored = client.load_state(tmp_path / "a")
    assert restored.id != a.id and restored.step == 1 and restored.spec == a.spec
    restored.forward_backward(batches[1], "ppo")
    restored.optim_step(lr=1e-2, weight_decay=0.1)
    for x, y in zip(restored.parameters(), expected):
        assert_close(x.detach(), y, torch.float32, "weights after the resumed step")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "client_state.json", "lora_engine.json",
                     "optimizer.safetensors"]
    assert json.loads((tmp_path / "a" / "client_state.json").read_text())["step"] == 1


def test_lora_plus_adapter_steps_b_faster():
    client = Client(tiny_model("qwen3"), eos_id=EOS, pad_id=PAD)
    a = client.create_adapter(rank=2, method="lora_plus", target_modules=("q_proj",))
    a.forward_backward(_batch(2, 4, 3, seed=11))
    a.optim_step(lr=1e-3)
    assert [g["lr"] for g in a.optimizer.param_groups] == [1e-3, 1e-3 * a.spec.lora_plus_ratio]
    assert a.spec.lora_plus_ratio == 16.0


def test_nan_gradient_skips_only_that_step():
    client, a, b = _client()
    a.forward_backward(_batch(2, 4, 3, seed=8), lambda logp, batch: logp.sum() * float("nan"))
    b.forward_backward(_batch(2, 4, 3, seed=9))
    before = [p.detach().clone() for p in a.parameters()]
    assert a.optim_step()["skipped"] and not b.optim_step()["skipped"]
    assert all(torch.equal(x, p) for x, p in zip(before, a.parameters()))


@pytest.mark.parametrize("change,loss,needle", [
    pytest.param(dict(advantages=None), "ppo", "advantages", id="no-advantages"),
    pytest.param(dict(rewards=None), "grpo", "rewards", id="grpo-no-rewards"),
    pytest.param(dict(sampling_logprobs=None), "importance_sampling", "sampling_logprobs", id="no-sampling-logp"),
    pytest.param(dict(), "reinforce", "unknown loss", id="unknown-loss"),
    pytest.param(dict(weights="first-column"), "ppo", r"weights\[:, 0\]", id="weight-on-token-0"),
])
def test_batch_errors(change, loss, needle):
    client, a, _ = _client()
    batch = _batch(2, 4, 3, seed=10)
    for k, v in change.items():
        if v == "first-column":
            batch.weights[:, 0] = 1.0
        else:
            setattr(batch, k, v)
    with pytest.raises(ValueError, match=needle):
        a.forward_backward(batch, loss)


def test_usage_errors():
    client, a, _ = _client()
    with pytest.raises(ValueError, match="forward_backward before optim_step"):
        a.optim_step()
    with pytest.raises(ValueError, match="tokenizer"):
        client.sample(["1+1="], adapter=a)


def test_example_rl_loop_runs(tmp_path, monkeypatch):
    from lora_engine.rl.tiny_model import build_tokenizer
    tok = build_tokenizer()
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    sys.modules.pop("client_rl_loop", None)
    import client_rl_loop
    out = client_rl_loop.main(["--model", str(tmp_path), "--steps", "2", "--pool", "64", "--eval", "4",
                               "--prompts", "2", "--samples", "2", "--max-new-tokens", "4"])
    assert set(out["after"]) == {"base", 0, 1}


def _tinker_batch(B, N, seed):
    """Tinker-aligned rows (input = seq[:-1], target = seq[1:]) with per-token advantages and
    sampler log-probs off by noise, so the clip ranges are hit."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, V, (B, N + 1), generator=g)
    attn = torch.ones(B, N, dtype=torch.long)
    attn[1, N - 2:] = 0  # a shorter row, right padded
    w = attn.float()
    return Batch(seq[:, :-1] * attn, w, attn, sampling_logprobs=-4.0 + 0.5 * torch.randn(B, N, generator=g),
                 advantages=torch.randn(B, N, generator=g) * attn, target_ids=seq[:, 1:] * attn)


TINKER_LOSSES = [
    pytest.param("cross_entropy", {}, id="cross_entropy"),
    pytest.param("importance_sampling", {}, id="importance_sampling"),
    pytest.param("ppo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.1}, id="ppo"),
    pytest.param("cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.5}, id="cispo"),
    pytest.param("dro", {"beta": 0.05}, id="dro"),
]


@pytest.mark.parametrize("loss,config", TINKER_LOSSES)
def test_tinker_loss_formulas(loss, config):
    """Tinker's definitions written out independently, in fp64 from the model's full logits:
    next-token alignment (target_ids), per-token advantages, sums over tokens."""
    batch = _tinker_batch(3, 7, seed=21)
    if loss == "cross_entropy":
        batch.weights[0, 2] = -0.5  # signed weights, as forward_backward_custom sends them
    if loss == "dro":
        # Same-sign terms: with mixed signs the scalar sum cancels to ~1e-6 relative, which
        # measures fp32 summation rather than the formula.
        batch.advantages = batch.advantages.abs()
    client, a, _ = _client()
    out = a.forward_backward(batch, loss, loss_config=config).result()
    ours = _grads(a)
    for p in a.parameters():
        p.grad = None
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    logits = client.engine(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                           adapter_ids=torch.full((3,), a.id)).logits.double()
    lp = torch.log_softmax(logits, -1).gather(-1, batch.target_ids[..., None]).squeeze(-1)
    lp = lp * batch.attention_mask
    w, q, A = batch.weights.double(), batch.sampling_logprobs.double(), batch.advantages.double()
    r = torch.exp(lp - q)
    if loss == "cross_entropy":
        per = lp
    elif loss == "importance_sampling":
        per = r * A
    elif loss == "ppo":
        per = torch.minimum(r * A, r.clamp(0.7, 1.1) * A)
    elif loss == "cispo":
        per = r.clamp(0.5, 1.5).detach() * lp * A
    else:
        per = lp * A - 0.025 * (lp - q) ** 2
    expected = -(w * per).sum()
    expected.backward()
    assert_close(torch.tensor(out.loss), expected.detach(), torch.float32, "loss")
    assert_close(out.logprobs, lp.detach(), torch.float32, "logprobs on every attended token")
    assert_close(ours, _grads(a), torch.float32, "grads")
    if loss in ("ppo", "cispo"):
        assert 0 < out.metrics["clip_frac"] < 1, "the test must hit the clip region"


def test_forward_shares_the_base_forward_and_leaves_no_gradient():
    client, a, b = _client()
    calls = _count_base_forwards(client)
    batch = _tinker_batch(2, 6, seed=22)
    fa = a.forward(batch, "cross_entropy")
    b.forward_backward(batch, "importance_sampling")
    client.flush()
    assert len(calls) == 1
    # a's rows share the packed LoRA matmul with b's, so its grads may exist, but hold zeros.
    assert all(p.grad is None or not p.grad.any() for p in a.parameters())
    assert all(p.grad is not None and p.grad.any() for p in b.parameters())
    assert_close(fa.result().logprobs, a.forward(batch).result().logprobs, torch.float32, "same logprobs alone")


def test_tinker_loss_config_errors():
    client, a, _ = _client()
    with pytest.raises(ValueError, match="needs loss_config"):
        a.forward_backward(_tinker_batch(2, 4, seed=23), "dro")
    batch = _tinker_batch(2, 4, seed=23)
    batch.weights[0, 1] = -1.0
    with pytest.raises(ValueError, match="only cross_entropy takes signed weights"):
        a.forward_backward(batch, "ppo")


def test_load_state_into_a_handle(tmp_path):
    client, a, b = _client()
    a.forward_backward(_batch(2, 4, 3, seed=24), "ppo")
    a.optim_step(lr=1e-2)
    a.save_state(tmp_path / "a")
    saved = [p.detach().clone() for p in a.parameters()]
    a.forward_backward(_batch(2, 4, 3, seed=25), "ppo")
    a.optim_step(lr=1e-2)
    a.load_state(tmp_path / "a")
    assert all(torch.equal(x, p) for x, p in zip(saved, a.parameters()))
    assert a.optimizer is not None and a.step == 1
    a.load_state(tmp_path / "a", optimizer=False)
    assert a.optimizer is None
    peft_only = tmp_path / "peft"
    client.engine.save_adapter(a.id, peft_only)
    with pytest.raises(ValueError, match="no optimizer state"):
        a.load_state(peft_only)


# TRL 1.16's loss types through the client's "grpo" (loss_type=): options per type, TRL's names.
TRL_TYPES = [pytest.param(lt, opts, id=lt) for lt, opts in (
    ("grpo", {}), ("bnpo", {}), ("dr_grpo", {"max_completion_length": 11}), ("dapo", {}), ("cispo", {}),
    ("sapo", {"sapo_temperature_neg": 1.25}), ("luspo", {}),
    ("vespo", {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 4.0, "vespo_lambda_neg": 0.5}))]


@pytest.mark.parametrize("loss_type,options", TRL_TYPES)
def test_trl_loss_types_through_the_client(loss_type, options):
    """TRL's definitions (tests/policy_loss_cases.formula, fp64 from the model's full logits) on
    group-normalised rewards, normalised over the batch as TRL does: loss, gradients, clipping."""
    from policy_loss_cases import formula

    batch = _batch(6, 4, 6, seed=31)
    # Groups pair long rows with short ones: group-normalised advantages sum to 0 per group, and
    # rows of similar length would cancel the loss down to fp32 summation noise.
    batch.group_ids = torch.tensor([0, 1, 2, 0, 1, 2])
    client, a, _ = _client()
    with torch.no_grad():  # sampler log-probs near the learner's: ratios ~ exp(N(0, 0.3^2)), as in RL
        noise = 0.3 * torch.randn(batch.weights.shape, generator=torch.Generator().manual_seed(32))
        batch.sampling_logprobs = ((_reference_logp(client, a, batch) + noise) * (batch.weights != 0)).float()
    eps_high = 1.2 if loss_type == "cispo" else 0.28  # cispo: the cap on the ratio
    out = a.forward_backward(batch, "grpo", loss_type=loss_type, eps_low=0.2, eps_high=eps_high,
                             loss_config=options).result()
    ours = _grads(a)
    for p in a.parameters():
        p.grad = None
    lp = _reference_logp(client, a, batch)
    adv = torch.zeros(6, dtype=torch.float64)
    for gid in batch.group_ids.unique():
        sel = batch.group_ids == gid
        rew = batch.rewards[sel].double()
        adv[sel] = (rew - rew.mean()) / (rew.std() + 1e-4)
    opts = dict(options)
    mcl = opts.pop("max_completion_length", None)
    losses, metrics = formula(lp, batch.sampling_logprobs.double(), adv, batch.weights.double(),
                              torch.zeros(6, dtype=torch.long), None, 1, loss_type=loss_type, eps_low=0.2,
                              eps_high=eps_high, mcl=mcl, **opts)
    losses[0].backward()
    # The loss is a whole pipeline ending in a sum over zero-mean advantages: measured against
    # PyTorch's own fp32 run of the same formula (fp32 logits and log_softmax) as the yardstick.
    with torch.no_grad():
        pos = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
        logits = client.engine(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                               adapter_ids=torch.full((6,), a.id)).logits
        lp32 = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        lp32 = torch.cat([lp32.new_zeros(6, 1), lp32], 1)
        own = formula(lp32, batch.sampling_logprobs, adv.float(), batch.weights, torch.zeros(6, dtype=torch.long),
                      None, 1, loss_type=loss_type, eps_low=0.2, eps_high=eps_high, mcl=mcl, **opts)[0]
    assert_as_close_as_torch(torch.tensor([out.loss], dtype=torch.float64), own[:1], losses[:1].detach(),
                             torch.float32, "loss")
    assert_close(ours, _grads(a), torch.float32, "grads")
    assert out.metrics["clip_frac"] == pytest.approx(float(metrics["clip_frac"][0]), abs=1e-6)
    if loss_type not in ("sapo", "vespo"):  # the soft surrogates have no hard clip
        assert 0 < out.metrics["clip_frac"] < 1, "the test must hit the clip region"


def test_trl_loss_type_errors():
    client, a, _ = _client()
    batch = _batch(2, 4, 3, seed=10)
    with pytest.raises(ValueError, match="loss='grpo'"):
        a.forward_backward(batch, "ppo", loss_type="sapo")
    with pytest.raises(ValueError, match="unknown loss_type"):
        a.forward_backward(batch, "grpo", loss_type="ppo")
    with pytest.raises(ValueError, match="not settings of TRL's 'sapo'"):
        a.forward_backward(batch, "grpo", loss_type="sapo", loss_config={"beta": 0.1})
    with pytest.raises(ValueError, match="sapo_temperature_pos must be > 0"):
        a.forward_backward(batch, "grpo", loss_type="sapo", loss_config={"sapo_temperature_pos": 0.0})
