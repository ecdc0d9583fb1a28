"""PPO in the trainer (``algorithm = "ppo"``): a critic per policy in the same bank, isolation of
every policy-critic pair, critic warm-up, the joint clipping of a critic and its value head,
micro-batches, resume, metrics, config errors."""
import json

import numpy as np
import pytest
import torch

from helpers import assert_close
from lora_engine.engine.model import MultiLoRAModel
from lora_engine.engine.optimizer import BankAdamW
from lora_engine.engine.spec import AdapterSpec
from lora_engine.rl.config import config_from_dict
from lora_engine.rl.critic import ValueHeads
from lora_engine.rl.tiny_model import build_tokenizer
from test_trainer import ADAPTERS, _model, _trainer

PPO = dict(algorithm="ppo", critic_rank=2, critic_lr=5e-3, beta=0.05, inner_updates=1, value_clip=0.2,
           gamma=0.9, lam=0.8)


def _ppo(tmp_path, adapters=ADAPTERS, **kw):
    return _trainer(tmp_path, adapters=adapters, **{**PPO, **kw})


def _grad(p):
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)


def _capture(tr):
    """Each pair's gradients (policy, critic, value head) as the PPO step hands them to AdamW."""
    got, real, ppo = {}, tr.ppo._bank_step, tr.ppo

    def step(pol, val, warm):
        for k, (a, c) in enumerate(zip(ppo.policy_ids, ppo.critic_ids)):
            got.setdefault(k, []).append({
                "policy": [_grad(p) for p in tr.engine.adapter_parameters(a)],
                "critic": [_grad(p) for p in tr.engine.adapter_parameters(c)],
                "head": [_grad(ppo.heads.weight)[a], _grad(ppo.heads.bias)[a]]})
        return real(pol, val, warm)

    tr.ppo._bank_step = step
    return got


def _state(tr, k):
    a, c = tr.ppo.policy_ids[k], tr.ppo.critic_ids[k]
    return ([p.detach().clone() for p in tr.engine.adapter_parameters(a)]
            + [p.detach().clone() for p in tr.engine.adapter_parameters(c)]
            + [tr.ppo.heads.weight[a].detach().clone(), tr.ppo.heads.bias[a].detach().clone()])


def test_critics_join_the_bank_after_the_policies_with_their_own_rank_and_lr(tmp_path):
    tr = _ppo(tmp_path)
    assert tr.ids == [0, 1, 2] and tr.ppo.critic_ids == [3, 4, 5]
    opt = BankAdamW.of(tr.engine.bank)
    for a, c in zip(tr.ids, tr.ppo.critic_ids):
        spec = tr.engine.adapter_spec(c)
        assert spec.rank == 2 and spec.lr == 5e-3 and spec.method == "lora"
        assert opt.group(c, 0)["lr"] == 5e-3 and tr.ppo.heads.lr[a] == 5e-3
    same = _ppo(tmp_path / "same", critic_rank=0, critic_lr=0.0)
    assert [same.engine.adapter_spec(c).rank for c in same.ppo.critic_ids] == [1, 4, 8]
    assert [same.engine.adapter_spec(c).lr for c in same.ppo.critic_ids] == [1e-2, 1e-2, 5e-3]


@pytest.mark.parametrize("kw", [
    pytest.param({}, id="kl-in-reward"),
    pytest.param({"kl_penalty": "loss", "loss_type": "cispo", "eps_high": 1.5}, id="kl-in-loss-cispo"),
    pytest.param({"micro_batch_size": 3, "kl_estimator": "low_var_kl"}, id="micro-batches"),
    pytest.param({"loss_type": "grpo", "micro_batch_size": 4}, id="grpo-micro-batches"),
])
def test_each_policy_and_critic_get_the_gradient_they_get_alone(tmp_path, kw):
    together = _ppo(tmp_path / "all", **kw)
    g_all = _capture(together)
    together.step(0)
    for part in ("policy", "critic", "head"):
        assert any(float(g.abs().sum()) > 0 for g in g_all[0][0][part]), f"the test must produce {part} gradients"
    for k, spec in enumerate(ADAPTERS):
        alone = _ppo(tmp_path / f"alone{k}", adapters=[spec], **kw)
        g_alone = _capture(alone)
        alone.step(0)
        for part in ("policy", "critic", "head"):
            for j, (got, want) in enumerate(zip(g_all[k][0][part], g_alone[0][0][part])):
                assert_close(got, want, torch.float32, f"adapter {k} {part} tensor {j}")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "luspo"])
def test_micro_batches_give_the_whole_batch_gradients_and_metrics(tmp_path, loss_type):
    whole = _ppo(tmp_path / "whole", loss_type=loss_type)
    micro = _ppo(tmp_path / "micro", micro_batch_size=5, loss_type=loss_type)
    g_whole, g_micro = _capture(whole), _capture(micro)
    out_w, out_m = whole.step(0), micro.step(0)
    for k in range(len(ADAPTERS)):
        for part in ("policy", "critic", "head"):
            for gw, gm in zip(g_whole[k][0][part], g_micro[k][0][part]):
                assert_close(gm.double(), gw.double(), torch.float32, f"adapter {k} {part}")
        for key in ("value_loss", "value_clip_frac", "explained_var", "kl", "clip_frac", "entropy"):
            assert out_m[k][key] == pytest.approx(out_w[k][key], rel=1e-5, abs=1e-7), key


def test_a_critic_sees_only_its_policys_sequences(tmp_path):
    tr = _ppo(tmp_path, micro_batch_size=5)
    calls, rollouts = [], []
    real_hidden, real_rollout = tr.engine.hidden_states, tr.rollout

    def hidden_states(input_ids, attention_mask, adapter_ids):
        calls.append((input_ids.clone(), adapter_ids.clone()))
        return real_hidden(input_ids, attention_mask, adapter_ids)

    def rollout(step):
        out = real_rollout(step)
        rollouts.append(out[2])
        return out

    tr.engine.hidden_states, tr.rollout = hidden_states, rollout
    tr.step(0)
    ro = rollouts[0]
    owner_of = {c: a for a, c in zip(tr.ppo.policy_ids, tr.ppo.critic_ids)}
    seen = 0
    for ids, routed in calls:
        if not set(routed.tolist()) & set(owner_of):
            continue  # rollout decoding: the policies only
        for row, c in zip(ids, routed.tolist()):
            if c in owner_of:
                a = owner_of[c]
                own = ro.input_ids[ro.adapter_ids == a]
                assert bool((own == row).all(1).any()), f"critic {c} was fed a row its policy {a} did not sample"
                seen += 1
    assert seen == 2 * ro.input_ids.shape[0], "every row goes through its critic once per pass (estimates, update)"


def test_critic_warmup_steps_only_the_critics(tmp_path):
    tr = _ppo(tmp_path, critic_warmup_steps=1)
    before = {k: _state(tr, k) for k in range(len(ADAPTERS))}
    rows = tr.step(0)
    opt = BankAdamW.of(tr.engine.bank)
    for k, a in enumerate(tr.ids):
        after = _state(tr, k)
        n_pol = len(tr.engine.adapter_parameters(a))
        assert all(torch.equal(x, y) for x, y in zip(after[:n_pol], before[k][:n_pol])), f"policy {a} moved"
        assert not any(torch.equal(x, y) for x, y in zip(after[-2:], before[k][-2:])), f"head {a} did not move"
        assert any(not torch.equal(x, y) for x, y in zip(after[n_pol:-2], before[k][n_pol:-2])), f"critic {a}"
        assert opt.steps[a] == 0 and opt.steps[tr.ppo.critic_ids[k]] == 1 and tr.ppo.heads.steps[a] == 1
        assert rows[a]["policy_updated"] is False and not rows[a]["critic_skipped"]
    tr.step(1)
    assert all(opt.steps[a] == 1 for a in tr.ids)


def test_a_critic_and_its_head_step_as_torch_adamw_clipped_together():
    """One clip_grad_norm_ over the critic's LoRA and its value head, then torch's AdamW."""
    tok = build_tokenizer()
    spec = AdapterSpec(rank=3, lr=2e-2, seed=4)
    engine = MultiLoRAModel(_model(tok), [spec])
    with torch.no_grad():
        for p in engine.adapter_parameters(0):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    heads = ValueHeads(32, {0: 7}, {0: 2e-2}, "cpu")
    opt = BankAdamW.of(engine.bank)
    opt.configure_from_spec(0, spec)
    ref = [p.detach().clone().requires_grad_(True) for p in engine.adapter_parameters(0)]
    ref += [heads.weight.detach()[0].clone().requires_grad_(True), heads.bias.detach()[0].clone().requires_grad_(True)]
    torch_opt = torch.optim.AdamW(ref, lr=2e-2, weight_decay=0.0)
    x = torch.randint(3, len(tok), (2, 6), generator=torch.Generator().manual_seed(2))
    for it in range(3):
        values = heads.values(engine.hidden_states(x, torch.ones_like(x), torch.zeros(2, dtype=torch.long)),
                              torch.zeros(2, dtype=torch.long))
        ((values - 3.0) ** 2).sum().backward()
        grads = [p.grad.clone() for p in engine.adapter_parameters(0)] + [heads.weight.grad[0].clone(),
                                                                          heads.bias.grad[0].clone()]
        extra = torch.zeros(1).index_copy(0, torch.tensor([0]), heads.grad_sumsq())
        norms = opt.step(None, 0.5, extra_sumsq=extra).numpy()
        heads.step(np.isfinite(norms), BankAdamW.clip_factors(norms, 0.5))
        opt.zero_grad()
        heads.zero_grad()
        for p, g in zip(ref, grads):
            p.grad = g
        want = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        assert float(want) == pytest.approx(float(norms[0]), rel=1e-5) and float(want) > 0.5, "clipping must bite"
        torch_opt.step()
        got = [p.detach() for p in engine.adapter_parameters(0)] + [heads.weight.detach()[0], heads.bias.detach()[0]]
        for j, (g, w) in enumerate(zip(got, ref)):
            assert_close(g, w.detach(), torch.float32, f"step {it} tensor {j}")


def test_resume_restores_critics_and_heads(tmp_path):
    full = _ppo(tmp_path / "full", steps=4, checkpoint_every=2)
    full.fit()
    crashed = _ppo(tmp_path / "crash", steps=4, checkpoint_every=2)
    real = crashed.step

    def step(i):
        if i == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(i)

    crashed.step = step
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    resumed = _ppo(tmp_path / "crash", steps=4, checkpoint_every=2)
    resumed.fit()
    for k in range(len(ADAPTERS)):
        for j, (got, want) in enumerate(zip(_state(resumed, k), _state(full, k))):
            assert torch.equal(got, want), f"pair {k} tensor {j} differs after resume"
    assert np.array_equal(resumed.ppo.heads.steps, full.ppo.heads.steps)
    ckpt = tmp_path / "full" / "checkpoints" / "step_000004"
    assert (ckpt / "critic_0" / "adapter_config.json").exists() and (ckpt / "critics.pt").exists()


def test_critic_metrics_are_verls_definitions_per_adapter(tmp_path):
    tr = _ppo(tmp_path)
    rows = tr.step(0)
    g = torch.Generator().manual_seed(3)
    B, L, A = 7, 5, tr.engine.bank.num_slots
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 2])
    mask = (torch.rand(B, L, generator=g) > 0.3).float()
    adv, vals, ret = (torch.randn(B, L, generator=g) * mask for _ in range(3))
    zero = torch.zeros(A)
    out = tr.ppo._critic_metrics({a: {"skipped": False} for a in tr.ids}, ids, mask, adv, vals, ret, zero, zero,
                                 np.zeros(A), np.zeros(A, bool), warm=False)
    for a in tr.ids:
        on = (ids[:, None] == a) & (mask > 0)
        R, V, Ad = ret[on].double(), vals[on].double(), adv[on].double()
        assert out[a]["explained_var"] == pytest.approx(float(1 - (R - V).var() / (R.var() + 1e-5)), rel=1e-9)
        assert out[a]["adv_std"] == pytest.approx(float(Ad.std()), rel=1e-9)
        assert out[a]["return_mean"] == pytest.approx(float(R.mean()), rel=1e-9)
    needed = {"value_loss", "value_clip_frac", "explained_var", "adv_std", "critic_grad_norm", "policy_updated"}
    assert all(needed <= set(r) and np.isfinite(r["value_loss"]) for r in rows.values())
    json.dumps(rows)


@pytest.mark.parametrize("data,match", [
    pytest.param({"algorithm": "a2c"}, "algorithm must be one of", id="algorithm"),
    pytest.param({"algorithm": "ppo", "loss_type": "vespo"}, "one advantage per sequence", id="sequence-loss"),
    pytest.param({"algorithm": "ppo", "gamma": 1.5}, "gamma must be in", id="gamma"),
    pytest.param({"algorithm": "ppo", "lam": -0.1}, "lam must be in", id="lam"),
    pytest.param({"algorithm": "ppo", "vf_coef": 0}, "vf_coef must be > 0", id="vf_coef"),
    pytest.param({"algorithm": "ppo", "value_clip": -1}, "value_clip must be >= 0", id="value_clip"),
    pytest.param({"algorithm": "ppo", "critic_rank": -2}, "critic_rank must be", id="critic_rank"),
    pytest.param({"algorithm": "ppo", "critic_warmup_steps": -1}, "critic_warmup_steps", id="warmup"),
    pytest.param({"algorithm": "ppo", "kl_penalty": "both"}, "kl_penalty must be", id="kl_penalty"),
    pytest.param({"algorithm": "ppo", "kl_estimator": "k9"}, "kl_estimator must be", id="kl_estimator"),
    pytest.param({"algorithm": "ppo", "drop_zero_variance": True}, "drop_zero_variance", id="drop-groups"),
    pytest.param({"algorithm": "ppo", "critic_lr": "fast"}, "critic_lr must be a number", id="type"),
    pytest.param({"algorithm": "ppo", "steps": 5, "critic_warmup_steps": 5}, "never be updated", id="warmup-all"),
    pytest.param({"gamma": 2.0}, "gamma must be in", id="ppo-field-under-grpo"),
    pytest.param({"algorithm": "ppo", "adapters": [{"rank": 2, "method": "adalora"}]}, "AdaLoRA's rank budget",
                 id="adalora-ppo"),
    pytest.param({"inner_updates": 2, "adapters": [{"rank": 2, "method": "adalora"}]}, "AdaLoRA's rank budget",
                 id="adalora-inner-updates"),
])
def test_ppo_config_errors(data, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict({"adapters": [{"rank": 2}], **data})


def test_ppo_takes_one_sample_per_prompt():
    assert config_from_dict({"adapters": [{"rank": 2}], "algorithm": "ppo", "samples_per_prompt": 1}).algorithm == "ppo"
