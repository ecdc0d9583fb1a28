"""The GRPO trainer: per-adapter isolation, resume, NaN containment, config errors."""
import json

import pytest
import torch
import transformers

from helpers import assert_close
from lora_engine import ops
from lora_engine.rl.advantages import group_advantages
from lora_engine.rl.config import config_from_dict, load_config
from lora_engine.rl.tiny_model import build_tokenizer
from lora_engine.rl.trainer import GRPOTrainer


class DistinctCharsTask:
    """A task whose reward varies on a random model: the number of distinct characters produced."""

    def __init__(self):
        self.problems = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]

    def sample_train(self, n, generator):
        idx = torch.randint(0, len(self.problems), (n,), generator=generator).tolist()
        return [self.problems[i] for i in idx]

    def eval_set(self, n):
        return self.problems[:n]

    def encode_prompt(self, tokenizer, problem):
        return tokenizer(problem["prompt"], add_special_tokens=False)["input_ids"]

    def score(self, problems, completions):
        return [len(set(c)) / 5 for c in completions]


def _model(tok):
    cfg = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


ADAPTERS = [{"rank": 1, "lr": 1e-2, "seed": 0}, {"rank": 4, "lr": 1e-2, "seed": 1, "lora_plus_ratio": 4.0},
            {"rank": 8, "lr": 5e-3, "seed": 2, "scaling": "rslora"}]


def _trainer(tmp_path, adapters=ADAPTERS, **kw):
    tok = build_tokenizer()
    base = {"adapters": adapters, "steps": 2, "prompts_per_step": 2, "samples_per_prompt": 4,
            "max_new_tokens": 5, "eval_problems": 8, "output_dir": str(tmp_path), "progress": False,
            "beta": 0.05, "inner_updates": 2, "checkpoint_every": 1}
    base.update(kw)
    return GRPOTrainer(config_from_dict(base), model=_model(tok), tokenizer=tok, task=DistinctCharsTask())


def _weights(tr, a):
    return [p.detach().clone() for p in tr.engine.adapter_parameters(a)]


def _capture_grads(tr):
    """Record each adapter's gradients as the trainer steps it (before AdamW, whose first update
    lr * g / (|g| + eps) would turn rounding noise in near-zero gradients into sign flips)."""
    grads = {}
    real = tr._bank_step

    def step(losses):
        for a in tr.ids:
            grads.setdefault(a, []).append([p.grad.clone() for p in tr.engine.adapter_parameters(a)])
        return real(losses)

    tr._bank_step = step
    return grads


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_step_gives_each_adapter_the_gradient_it_gets_alone(tmp_path, loss_type):
    # One inner update: a second one starts from weights that AdamW has already nudged by
    # rounding noise, which is optimiser amplification, not a leak between adapters.
    together = _trainer(tmp_path / "all", loss_type=loss_type, inner_updates=1)
    g_all = _capture_grads(together)
    together.step(0)
    assert any(float(g.abs().sum()) > 0 for g in g_all[0][0]), "the test task must produce gradients"
    for k, spec in enumerate(ADAPTERS):
        alone = _trainer(tmp_path / f"alone{k}", adapters=[spec], loss_type=loss_type, inner_updates=1)
        g_alone = _capture_grads(alone)
        alone.step(0)
        for inner, (got_list, want_list) in enumerate(zip(g_all[k], g_alone[0])):
            for j, (got, want) in enumerate(zip(got_list, want_list)):
                assert_close(got, want, torch.float32, f"adapter {k} inner update {inner} tensor {j}")


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "full", steps=4, checkpoint_every=2)
    full.fit()
    crashed = _trainer(tmp_path / "crash", steps=4, checkpoint_every=2)
    real_step = crashed.step

    def step(i):
        if i == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_step(i)

    crashed.step = step
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed = _trainer(tmp_path / "crash", steps=4, checkpoint_every=2)
    resumed.fit()
    assert resumed.step_idx == 4
    for a in range(len(ADAPTERS)):
        for got, want in zip(_weights(resumed, a), _weights(full, a)):
            assert torch.equal(got, want), f"adapter {a} differs after resume"
    steps_logged = [json.loads(l)["step"] for l in open(tmp_path / "crash" / "log.jsonl")]
    assert steps_logged.count(2) == len(ADAPTERS) and 3 in steps_logged


def test_nan_adapter_skips_its_step_and_leaves_others_identical(tmp_path):
    clean = _trainer(tmp_path / "clean")
    poisoned = _trainer(tmp_path / "poisoned")
    with torch.no_grad():
        for p in poisoned.engine.adapter_parameters(1):
            p.fill_(float("nan"))
    for s in range(2):
        clean.step(s)
        rows = poisoned.step(s)
        assert rows[1]["skipped"] and not rows[0]["skipped"] and not rows[2]["skipped"]
    for a in (0, 2):
        for got, want in zip(_weights(poisoned, a), _weights(clean, a)):
            assert_close(got, want, torch.float32, f"adapter {a}")
    assert all(torch.isnan(p).all() for p in poisoned.engine.adapter_parameters(1)), "no update on NaN"


def test_metrics_logged_per_adapter(tmp_path):
    tr = _trainer(tmp_path)
    rows = tr.step(0)
    needed = {"reward_mean", "reward_std", "accuracy", "kl", "entropy", "adv_std", "clip_frac", "response_len",
              "truncated_frac", "tokens_total", "wall_s"}
    for r in rows.values():
        assert needed <= set(r)
        assert r["tokens_total"] > 0 and r["entropy"] > 0


@pytest.mark.parametrize("data,match", [
    pytest.param({"adapters": []}, "no adapters", id="no-adapters"),
    pytest.param({"adapters": [{"rank": 2}], "loss_type": "ppo2"}, "loss_type", id="bad-loss"),
    pytest.param({"adapters": [{"rank": 2}], "stepz": 3}, "unknown config key", id="typo-key"),
    pytest.param({"adapters": [{"rank": 2, "rnak": 3}]}, "unknown adapter field", id="typo-adapter"),
    pytest.param({"adapters": [{"rank": 2}], "samples_per_prompt": 1}, "samples_per_prompt", id="group-of-1"),
    pytest.param({"adapters": [{"rank": 0}]}, "rank must be", id="rank0"),
])
def test_config_errors(data, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(data)


def test_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('steps = 5\n[[adapters]]\nrank = 2\n[[adapters]]\nrank = 4\n')
    cfg = load_config(p, ["steps=7", "adapters.1.lr=0.01", "loss_type=grpo"])
    assert cfg.steps == 7 and cfg.adapters[1].lr == 0.01 and cfg.loss_type == "grpo"
    with pytest.raises(ValueError, match="key=value"):
        load_config(p, ["steps"])
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_cli_reports_config_errors(tmp_path, capsys):
    from lora_engine.cli import main

    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reasoning_gym_task_with_chat_template_gives_token_ids():
    from lora_engine.rl.tasks import ReasoningGymTask

    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}<bos>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}\n{% endif %}"
    task = ReasoningGymTask("basic_arithmetic", seed=0, size=20)
    problem = task.sample_train(1, torch.Generator().manual_seed(0))[0]
    ids = task.encode_prompt(tok, problem)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]).startswith(problem["prompt"][:10])


def test_decode_drops_positions_after_eos(tmp_path):
    from lora_engine.rl.rollout import Rollouts

    tr = _trainer(tmp_path, adapters=ADAPTERS[:1])
    tok = tr.tokenizer
    ids = torch.tensor([tok("12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    ro = Rollouts(input_ids=ids, attention_mask=mask, completion_ids=ids, completion_mask=mask,
                  sampling_logp=torch.zeros(1, 5), truncated=torch.tensor([False]), adapter_ids=torch.tensor([0]),
                  prompt_len=0, prompt_tokens=torch.tensor([0]))
    assert tr.decode(ro) == ["12"]


def test_resume_refuses_a_different_config(tmp_path):
    _trainer(tmp_path, steps=1).fit()
    with pytest.raises(ValueError, match="different config"):
        _trainer(tmp_path, steps=2, beta=0.1).fit()
    longer = _trainer(tmp_path, steps=2)  # extending the run is allowed
    longer.fit()
    assert longer.step_idx == 2
    fresh = _trainer(tmp_path, steps=1, beta=0.1, resume=False)
    fresh.fit()
    assert [json.loads(l)["step"] for l in open(tmp_path / "log.jsonl")] == [0] * len(ADAPTERS)


def test_length_weight_applies_rewards_length_penalty(tmp_path):
    from lora_engine.rl.rollout import Rollouts

    tr = _trainer(tmp_path, adapters=ADAPTERS[:1], length_weight=0.5)  # max_new_tokens 5: soft cap 4
    ids = torch.full((2, 5), 7)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    ro = Rollouts(input_ids=ids, attention_mask=mask, completion_ids=ids, completion_mask=mask,
                  sampling_logp=torch.zeros(2, 5), truncated=torch.tensor([True, False]),
                  adapter_ids=torch.tensor([0, 0]), prompt_len=0, prompt_tokens=torch.tensor([0, 0]))
    problems = tr.task.problems[:2]
    total, correct = tr.rewards(problems, ro)
    assert torch.equal(total - correct, torch.tensor([-0.5, 0.0]))


def test_token_logprobs_only_generated_tokens_go_through_the_lm_head(tmp_path, monkeypatch):
    """Generated positions get log p(token) and entropy of the full softmax; padding after EOS
    holds 0 and is never projected onto the vocabulary."""
    tr = _trainer(tmp_path, max_new_tokens=6)
    _, _, ro = tr.rollout(0)
    assert (ro.completion_mask == 0).any(), "the test needs a rollout with padding after EOS"
    from lora_engine import ops
    seen, real = [], ops.token_logprobs

    def spy(h, w, t, **kw):
        seen.append(h.shape[0])
        return real(h, w, t, **kw)

    monkeypatch.setattr(ops, "token_logprobs", spy)
    with torch.no_grad():
        logp, ent = tr.token_logprobs(ro, ro.adapter_ids, entropy=True)
    assert seen == [int(ro.completion_mask.sum())]  # rows projected onto the vocabulary

    P, C = ro.prompt_len, ro.completion_ids.shape[1]
    pos = (ro.attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), tr.engine.use_adapters(ro.adapter_ids):
        logits = tr.engine.model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                                 position_ids=pos).logits[:, P - 1:P + C - 1].double()
    lsm = torch.log_softmax(logits / tr.cfg.temperature, -1)
    want_lp = lsm.gather(-1, ro.completion_ids[..., None]).squeeze(-1)
    want_ent = -(lsm.exp() * lsm).sum(-1)
    m = ro.completion_mask.bool()
    assert_close(logp[m].double(), want_lp[m], dtype=torch.float32)
    assert_close(ent[m].double(), want_ent[m], dtype=torch.float32)
    assert (logp[~m] == 0).all() and (ent[~m] == 0).all()


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_micro_batches_change_memory_not_the_update(tmp_path, loss_type):
    """Gradient accumulation over micro-batches of 3 sequences (splitting adapters and prompt
    groups mid-way) gives every adapter the whole-batch gradient and the same step metrics."""
    whole = _trainer(tmp_path / "whole", loss_type=loss_type, inner_updates=1)
    micro = _trainer(tmp_path / "micro", loss_type=loss_type, inner_updates=1, micro_batch_size=3)
    g_whole, g_micro = _capture_grads(whole), _capture_grads(micro)
    out_w, out_m = whole.step(0), micro.step(0)
    for a in range(len(ADAPTERS)):
        for gw, gm in zip(g_whole[a][0], g_micro[a][0]):
            assert_close(gm.double(), gw.double(), dtype=torch.float32, name=f"adapter {a} grad")
        for key in ("kl", "clip_frac", "entropy", "reward_mean", "tokens_step"):
            assert out_m[a][key] == pytest.approx(out_w[a][key], rel=1e-5, abs=1e-7), key


def test_micro_batch_size_must_be_a_non_negative_int(tmp_path):
    with pytest.raises(ValueError, match="micro_batch_size must be an int >= 0"):
        _trainer(tmp_path, micro_batch_size=-1)


def test_stitched_micro_batch_logprobs_equal_the_whole_batch(tmp_path):
    """old/ref log-probs computed micro-batch by micro-batch equal one whole-batch pass."""
    tr = _trainer(tmp_path, micro_batch_size=5)
    _, _, ro = tr.rollout(0)
    chunks = tr._micro_batches(len(ro.adapter_ids), ro.input_ids.device)
    assert len(chunks) > 1
    with torch.no_grad():
        for base in (False, True):
            whole = tr.token_logprobs(ro, torch.full_like(ro.adapter_ids, -1) if base else ro.adapter_ids)
            assert_close(tr._stitch(ro, chunks, base=base).double(), whole.double(), dtype=torch.float32)


@pytest.mark.parametrize("override, message", [
    pytest.param("steps=abc", "TrainConfig.steps must be an int, got 'abc'", id="str-for-int"),
    pytest.param("steps=true", "TrainConfig.steps must be an int", id="bool-for-int"),
    pytest.param("temperature=hot", "TrainConfig.temperature must be a number", id="str-for-float"),
    pytest.param("resume=1", "TrainConfig.resume must be true/false", id="int-for-bool"),
    pytest.param("delta=[1]", "TrainConfig.delta must be a number or none", id="list-for-optional"),
    pytest.param("prompts_per_step=[2]", "prompts_per_step has 1 entries for 3 adapters", id="per-adapter-length"),
    pytest.param("adapters.0.lr=fast", "AdapterSpec.lr must be a number", id="adapter-field"),
    pytest.param("adapters.9.lr=1", "adapters.<i>.<field>=value with i in 0..2", id="adapter-index"),
])
def test_every_bad_override_is_one_line_naming_the_fix(tmp_path, capsys, override, message):
    from lora_engine.cli import main

    p = tmp_path / "c.toml"
    p.write_text("steps = 2\n" + "".join(f"[[adapters]]\nrank = {r}\n" for r in (1, 2, 4)))
    assert main(["train", str(p), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_old_key_names_still_load_and_mean_the_same():
    from lora_engine.rl.config import config_from_dict, upgrade_saved_config

    old = config_from_dict({"seed": 3, "adapter_prompts_per_step": [2, 4], "adapters": [{"rank": 1}, {"rank": 2}]})
    assert old.data_seed == 3 and old.prompts_per_adapter == (2, 4)
    assert upgrade_saved_config({"seed": 3, "adapter_prompts_per_step": [], "prompts_per_step": 8}) == \
        {"data_seed": 3, "prompts_per_step": 8}
    with pytest.raises(ValueError, match="old name of 'data_seed'"):
        config_from_dict({"seed": 1, "data_seed": 2, "adapters": [{"rank": 1}]})


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "sapo", "dapo"])
def test_dropped_groups_leave_every_normaliser(tmp_path, loss_type):
    """drop_zero_variance: a group whose rewards are all equal is gone from the batch, so the
    update equals the loss over the kept sequences alone (grpo's mean over sequences included)."""
    kw = dict(adapters=ADAPTERS[:1], loss_type=loss_type, drop_zero_variance=True, beta=0.0, inner_updates=1,
              samples_per_prompt=4, prompts_per_step=2)
    tr, twin = _trainer(tmp_path / "a", **kw), _trainer(tmp_path / "b", **kw)  # the twin computes the reference
    _, prompt_of, ro = tr.rollout(0)
    # Group 0 (prompt 0): equal rewards, dropped; group 1: varied rewards, kept.
    reward = torch.tensor([1.0 if j == 0 else float(k % 2) for k, j in enumerate(prompt_of)])
    tr.rollout = lambda step: (None, prompt_of, ro)
    tr.rewards = lambda problems, r: (reward, reward)
    grads = _capture_grads(tr)
    tr.step(0)
    kept = torch.tensor([j == 1 for j in prompt_of])
    adv, _, _ = group_advantages(reward[kept], torch.zeros(int(kept.sum()), dtype=torch.long))
    sub = ro.select(kept.nonzero().squeeze(1))
    logp = twin.token_logprobs(sub, sub.adapter_ids)
    losses, _ = ops.policy_loss(logp, logp.detach(), adv, sub.completion_mask.float(), sub.adapter_ids,
                                loss_type=loss_type, num_adapters=1, max_completion_length=5)
    losses.sum().backward()
    want = [p.grad for p in twin.engine.adapter_parameters(0)]
    assert any(float(g.abs().sum()) > 0 for g in want)
    for j, (got, w) in enumerate(zip(grads[0][0], want)):
        assert_close(got, w, torch.float32, f"tensor {j}")


def test_float16_needs_loss_scaling_and_the_scale_does_not_change_the_update(tmp_path):
    with pytest.raises(ValueError, match="loss_scale = 1024"):
        config_from_dict({"dtype": "float16", "adapters": [{"rank": 1}]})
    assert config_from_dict({"dtype": "float16", "loss_scale": 1024, "adapters": [{"rank": 1}]}).loss_scale == 1024
    plain, scaled = _trainer(tmp_path / "p", inner_updates=1), _trainer(tmp_path / "s", inner_updates=1, loss_scale=1024)
    g_plain, g_scaled = _capture_grads(plain), _capture_grads(scaled)
    plain.step(0)
    scaled.step(0)
    for a in range(len(ADAPTERS)):
        for got, want in zip(g_scaled[a][0], g_plain[a][0]):
            assert_close(got, want, torch.float32, f"adapter {a}")


def test_dtype_auto_is_fp32_on_a_cpu_and_bf16_on_cuda():
    from lora_engine.rl.models import resolve_dtype

    assert config_from_dict({"adapters": [{"rank": 1}]}).dtype == "auto"
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
