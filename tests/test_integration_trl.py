"""TRL's GRPOTrainer on lora-engine: loss and adapter gradients equal TRL's own path for each
loss type, the wrapped model, a 2-step training run, PEFT-format checkpoints, unsupported settings."""
import copy

import pytest
import torch
import transformers

import lora_engine as le
from helpers import assert_as_close_as_torch, assert_close

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from lora_engine.interop.trl import (LoraEngineGRPOTrainer, adapter_disabled, check_trl_args,  # noqa: E402
                                          wrap_for_trl)
from lora_engine.rl.tiny_model import build_tokenizer  # noqa: E402

TOK = build_tokenizer()
# Two projections per layer keep the CPU cost of the reference LoRA path low; the loss path
# under test is the same whatever the adapter covers.
TARGETS = ("q_proj", "v_proj")


def _base(seed=0):
    cfg = transformers.Qwen3Config(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=64, pad_token_id=TOK.pad_token_id,
                                   eos_token_id=TOK.eos_token_id, bos_token_id=TOK.bos_token_id)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _randomize_adapter(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.lora_engine.bank.named_parameters_of(0).items():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _reward(completions, **kwargs):
    return [len(set(c)) / 4.0 for c in completions]


def _trainer(tmp_path, spec=None, **config):
    model = wrap_for_trl(_base(), spec or le.AdapterSpec(rank=4, alpha=8), target_modules=TARGETS)
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                num_generations=2, max_completion_length=6, max_steps=2, logging_steps=1, save_strategy="no",
                bf16=False, learning_rate=1e-2, seed=0)
    base.update(config)
    dataset = datasets.Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(3)]})
    return LoraEngineGRPOTrainer(model=model, reward_funcs=_reward, args=trl.GRPOConfig(**base),
                                 train_dataset=dataset, processing_class=TOK)


def _inputs(trainer, B=6, P=4, C=7, seed=0):
    """A GRPO micro-batch as _generate_and_score_completions builds it: left-padded prompts,
    right-padded completions (one empty), old/ref log-probs off by noise so every clip region is hit."""
    g = torch.Generator().manual_seed(seed)
    V = len(TOK)
    prompt_ids = torch.randint(5, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_ids[0, :2] = TOK.pad_token_id
    completion_ids = torch.randint(5, V, (B, C), generator=g)
    lengths = torch.tensor([C, 3, 1, C, 5, 0])[:B]
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = TOK.pad_token_id
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), C)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                old_per_token_logps=logp + 0.3 * torch.randn(B, C, generator=g),
                ref_per_token_logps=logp + 0.3 * torch.randn(B, C, generator=g),
                num_items_in_batch=completion_mask.sum() * 2)


def _loss_and_grads(fn, trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = fn(trainer.model, inputs)
    loss.backward()
    params = trainer.lora_engine.adapter_parameters(0)
    return loss.detach(), [p.grad.detach().clone() for p in params]


def _trl_loss_fp64(trainer, inputs):
    """TRL's own loss computed in fp64: the same GRPOTrainer._compute_loss on a .double() copy of
    the wrapped model and of the float inputs. The copy uses sdpa attention: HF eager attention
    runs its softmax in fp32, which turns the fp64 padding mask of the left-padded prompt into NaN."""
    model64 = copy.deepcopy(trainer.model).double()
    model64.set_attn_implementation("sdpa")
    inputs64 = {k: v.double() if torch.is_floating_point(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        return trl.GRPOTrainer._compute_loss(trainer, model64, inputs64).detach()


CASES = [pytest.param(lt, {}, id=lt) for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")] + [
    pytest.param("vespo", dict(beta=0.04), id="vespo-kl-biascorr"),
    pytest.param("cispo", dict(epsilon_high=5.0, gradient_accumulation_steps=2), id="cispo-cap5-accum2"),
    pytest.param("sapo", dict(importance_sampling_level="sequence", beta=0.04, use_bias_correction_kl=False),
                 id="sapo-sequence-kl"),
    pytest.param("luspo", dict(importance_sampling_level="sequence", delta=1.5), id="luspo-sequence-delta"),
    pytest.param("dapo", dict(beta=0.04, delta=1.5, epsilon_high=0.28), id="dapo-kl-biascorr-delta"),
    pytest.param("grpo", dict(beta=0.04, use_bias_correction_kl=False), id="grpo-kl"),
    pytest.param("dr_grpo", dict(beta=0.04, gradient_accumulation_steps=2), id="dr_grpo-kl-accum2"),
    pytest.param("bnpo", dict(importance_sampling_level="sequence", beta=0.04), id="bnpo-sequence-kl"),
    pytest.param("grpo", dict(importance_sampling_level="sequence", delta=1.3), id="gspo-delta"),
    pytest.param("dapo", dict(gradient_accumulation_steps=2, temperature=0.7), id="dapo-accum2-temp"),
]


@pytest.mark.parametrize("loss_type,config", CASES)
def test_loss_and_grads_match_trl(tmp_path, loss_type, config):
    trainer = _trainer(tmp_path, loss_type=loss_type, **config)
    _randomize_adapter(trainer.model)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = config.get("gradient_accumulation_steps", 1)
    inputs = _inputs(trainer)
    ours, g_ours = _loss_and_grads(trainer._compute_loss, trainer, inputs)
    m_ours = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    theirs, g_theirs = _loss_and_grads(lambda m, x: trl.GRPOTrainer._compute_loss(trainer, m, x), trainer, inputs)
    m_theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    # The loss is a scalar out of a whole model, and it can nearly cancel (seed 0, grpo: -0.0138):
    # two fp32 pipelines differ by more than one op's TOL, and one cancelled scalar's relative error
    # is noise. So the losses of several micro-batches, as a vector (rel_rms at the loss's own scale),
    # must be as close to TRL's computation in fp64 as TRL's own fp32 run is.
    more = [_inputs(trainer, seed=s) for s in (1, 2, 3)]
    with torch.no_grad():
        ours_all = torch.stack([ours] + [trainer._compute_loss(trainer.model, x).detach() for x in more])
        theirs_all = torch.stack([theirs] + [trl.GRPOTrainer._compute_loss(trainer, trainer.model, x).detach()
                                             for x in more])
    ref64 = torch.stack([_trl_loss_fp64(trainer, x) for x in [inputs] + more])
    assert_as_close_as_torch(ours_all, theirs_all, ref64, torch.float32, "loss over 4 micro-batches")
    assert_close(torch.cat([g.flatten() for g in g_ours]), torch.cat([g.flatten() for g in g_theirs]),
                 torch.float32, "adapter grads")
    assert any(float(g.abs().max()) > 0 for g in g_ours)
    keys = ["entropy"] + (["kl"] if config.get("beta") else [])
    if config.get("importance_sampling_level", "token") == "token" and loss_type not in ("cispo", "sapo", "vespo"):
        keys += ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    if loss_type == "cispo":
        keys += ["cispo_clip_ratio"]
    for k in keys:
        assert abs(m_ours[k] - m_theirs[k]) <= 1e-5 * max(1.0, abs(m_theirs[k])), k


def test_wrapped_model_is_one_always_on_adapter():
    spec = le.AdapterSpec(rank=3, alpha=6)
    model = wrap_for_trl(_base(), spec, target_modules=TARGETS)
    _randomize_adapter(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"lora_engine_bank.{n}" for n, p in model.lora_engine.bank.named_parameters()}
    ids = torch.randint(5, len(TOK), (3, 9), generator=torch.Generator().manual_seed(0))
    engine = le.MultiLoRAModel(_base(), [spec], target_modules=TARGETS)
    with torch.no_grad():
        for (n, p), q in zip(engine.bank.named_parameters_of(0).items(), model.lora_engine.adapter_parameters(0)):
            p.copy_(q)
        wrapped = model(ids).logits
        expected = engine(ids, adapter_ids=torch.zeros(3, dtype=torch.long)).logits
        with adapter_disabled(model):
            off = model(ids).logits
        base = engine(ids).logits
    assert_close(wrapped, expected, torch.float32, "adapter 0 on every row")
    assert_close(off, base, torch.float32, "adapter off = base")
    assert (wrapped - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_for_trl(model, spec)


def test_dora_through_the_wrapper_sees_every_update(monkeypatch):
    """No-grad forwards (generation) of a DoRA adapter compute each module's norm once, follow
    in-place updates, and the never-ending routing context's memo stays bounded."""
    from lora_engine.engine import methods

    calls = []
    real = methods.dora_norms
    monkeypatch.setattr(methods, "dora_norms", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    model = wrap_for_trl(_base(), le.AdapterSpec(rank=2, method="dora"), target_modules=TARGETS)
    ids = torch.randint(5, len(TOK), (2, 6), generator=torch.Generator().manual_seed(2))
    n_modules = len(model.lora_engine.bank.modules_of(0))
    with torch.no_grad():
        for _ in range(3):  # three decode steps: one norm per module, reused
            model(ids)
        assert len(calls) == n_modules
        _randomize_adapter(model)
        after = model(ids).logits
        assert len(calls) == 2 * n_modules, "an in-place update must recompute the norms"
    engine = le.MultiLoRAModel(_base(), [le.AdapterSpec(rank=2, method="dora")], target_modules=TARGETS)
    with torch.no_grad():
        for p, q in zip(engine.bank.named_parameters_of(0).values(),
                        model.lora_engine.bank.named_parameters_of(0).values()):
            p.copy_(q)
        assert_close(after, engine(ids, adapter_ids=torch.zeros(2, dtype=torch.long)).logits, torch.float32, "logits")
    memo = model.lora_engine.state.memo
    assert len([k for k in memo if k[0] == "dora"]) == n_modules, "one norm per module, the newest"


def test_two_step_training_run_and_peft_checkpoint(tmp_path):
    peft = pytest.importorskip("peft")
    trainer = _trainer(tmp_path / "run", beta=0.04, per_device_train_batch_size=2, max_completion_length=4,
                       gradient_checkpointing=False)
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    adapter_before = [p.detach().clone() for p in trainer.lora_engine.adapter_parameters(0)]
    out = trainer.train()
    assert out.global_step == 2 and torch.isfinite(torch.tensor(out.training_loss))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("entropy" in h and "kl" in h for h in logs)
    assert any(not torch.equal(a, p) for a, p in zip(adapter_before, trainer.lora_engine.adapter_parameters(0)))
    assert all(torch.equal(base_before[n], p) for n, p in trainer.model.named_parameters() if n in base_before)

    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    pm = peft.PeftModel.from_pretrained(_base(), str(tmp_path / "final"))
    ids = torch.randint(5, len(TOK), (2, 8), generator=torch.Generator().manual_seed(1))
    trainer.model.eval()
    with torch.no_grad():
        assert_close(pm(ids).logits, trainer.model(ids).logits, torch.float32, "PEFT reload of the TRL run")


@pytest.mark.parametrize("config,needle", [
    pytest.param(dict(loss_type="ppo"), "loss_type", id="unknown-loss-type"),
    pytest.param(dict(top_entropy_quantile=0.5), "top_entropy_quantile", id="entropy-mask"),
    pytest.param(dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold", id="off-policy-mask"),
    pytest.param(dict(entropy_coef=0.01), "entropy", id="entropy-bonus"),
])
def test_unsupported_settings_are_clear_errors(tmp_path, config, needle):
    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **config)
    with pytest.raises(ValueError, match=needle):
        check_trl_args(args)


def test_unwrapped_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="wrap_for_trl"):
        LoraEngineGRPOTrainer(model=_base(), reward_funcs=_reward,
                              args=trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
