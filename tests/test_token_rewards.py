"""Token-level rewards: deposit-density branching against an independent fp64 formula, deposits
from any reward shape, the PRM's step-boundary deposits, the distillation reward against the
explicit log-softmax difference, and a trainer step in every regime."""
import json
import math

import pytest
import torch
import transformers

from helpers import assert_close
from lora_engine.rl.advantages import DENSE_THRESHOLD, deposit_advantages, group_advantages
from lora_engine.rl.token_rewards import Deposits, as_deposits, last_token_deposits, per_adapter

EPS = 1e-4


def formula(values, placed, mask, groups, threshold=DENSE_THRESHOLD, scale="std"):
    """Study C's advantages, written out per group and per token in Python floats."""
    B, L = values.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for g in sorted(set(groups.tolist())):
        rows = [b for b in range(B) if groups[b] == g]
        valid = [(b, t) for b in rows for t in range(L) if mask[b, t]]
        deps = [(b, t) for b, t in valid if placed[b, t]]
        dense = len(deps) / max(len(valid), 1) > threshold
        pool = [float(values[b, t]) if placed[b, t] else 0.0 for b, t in (valid if dense else deps)]
        mean = sum(pool) / len(pool) if pool else 0.0
        sd = math.sqrt(sum((x - mean) ** 2 for x in pool) / (len(pool) - 1)) if len(pool) > 1 else float("nan")

        def norm(x):
            z = x - mean if scale == "none" else (x - mean) / (sd + EPS)
            return 0.0 if math.isnan(z) else z
        for b in rows:
            for t in range(L):
                if not mask[b, t]:
                    continue
                if dense:
                    out[b, t] = norm(float(values[b, t]) if placed[b, t] else 0.0)
                else:  # DeepSeekMath 4.1.3: the sum of the normalised deposits from t on
                    out[b, t] = sum(norm(float(values[b, s])) for s in range(t, L) if mask[b, s] and placed[b, s])
    return out


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    B, L = 12, 9
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    # per group a deposit probability: outcome-like (last token), ~0.3 (process), 1 (distillation), ~0.7
    p = torch.tensor([0.0, 0.3, 1.0, 0.7])[groups][:, None].expand(B, L)
    placed = (torch.rand(B, L, generator=g) < p) & mask
    last = lengths - 1
    placed[torch.arange(3), last[:3]] = True
    values = torch.randn(B, L, generator=g).round(decimals=1)  # some exact zeros among the deposits
    values[0, last[0]] = 0.0
    return values, placed, mask, groups


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_density_branching_matches_the_independent_formula(seed, scale):
    values, placed, mask, groups = _batch(seed)
    adv, stats = deposit_advantages(values, mask, groups, placed=placed, scale=scale)
    assert_close(adv.double(), formula(values, placed, mask, groups, scale=scale), torch.float32, "advantages")
    assert adv.dtype == torch.float32 and (adv[~mask] == 0).all()
    density = [float(placed[groups == g].sum() / mask[groups == g].sum()) for g in range(4)]
    assert density[0] <= 0.5 and density[2] == 1.0  # outcome-like sparse, distillation-like dense
    assert stats["frac_dense_rows"] == sum(d > DENSE_THRESHOLD for d in density) / 4


@pytest.mark.parametrize("density,dense", [pytest.param(0.5, False, id="at-threshold-sparse"),
                                           pytest.param(4 / 7, True, id="above-dense")])
def test_threshold_rule(density, dense):
    L = 14 if density == 0.5 else 7
    mask = torch.ones(2, L, dtype=torch.bool)
    placed = torch.zeros(2, L, dtype=torch.bool)
    k = round(density * L)
    placed[:, :k] = True
    values = torch.arange(2 * L, dtype=torch.float32).view(2, L) / 10
    adv, stats = deposit_advantages(values, mask, [0, 0], placed=placed)
    assert stats["frac_dense_rows"] == float(dense)
    assert_close(adv.double(), formula(values, placed, mask, torch.tensor([0, 0])), torch.float32, "advantages")


def test_outcome_deposits_equal_group_advantages_with_unequal_lengths():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    lengths = torch.tensor([3, 7, 1, 5, 2, 6])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    dep = last_token_deposits(rewards, mask)
    assert dep.placed.sum(1).tolist() == [1] * 6 and dep.placed[torch.arange(6), lengths - 1].all()
    adv, _ = deposit_advantages(dep.values, mask, groups, placed=dep.placed)
    seq, _, _ = group_advantages(rewards, groups)
    assert_close(adv, torch.where(mask, seq[:, None].expand(6, 7), torch.zeros(())), torch.float32, "advantages")


def test_as_deposits_takes_every_reward_shape():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    seq = as_deposits([0.0, 2.0], mask)
    assert seq.placed.tolist() == [[False, False, True, False], [False, True, False, False]]
    assert seq.values[1, 1] == 2.0
    tok = as_deposits(torch.tensor([[0.5, 0.0, 1.0, 9.0], [0.0, 0.0, 3.0, 0.0]]), mask)
    assert tok.placed.tolist() == [[True, False, True, False], [False, False, False, False]]
    assert tok.values[0, 3] == 0 and tok.values[1, 2] == 0  # under mask 0: dropped
    explicit = as_deposits(Deposits(torch.zeros(2, 4), mask.clone()), mask)
    assert explicit.placed.equal(mask)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        as_deposits(torch.zeros(2, 3), mask)
    with pytest.raises(ValueError, match="nan"):
        as_deposits(torch.full((2, 4), float("nan")), mask)


def test_per_adapter_std_is_over_each_adapters_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 0.0, 0.0], [5.0, 7.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    got = per_adapter(x, mask, torch.tensor([0, 0, 1]), 3)
    assert_close(got["std"][:2], torch.tensor([1.0, 2.0], dtype=torch.float64), torch.float64, "std")
    assert math.isnan(got["std"][2]) and got["count"].tolist() == [3, 3, 0]


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    from lora_engine.rl.tiny_judges import build_tiny_prm, build_tiny_teacher
    root = tmp_path_factory.mktemp("judges")
    return (build_tiny_prm(cache_dir=root, steps=0, init="random", progress=False),
            build_tiny_teacher(cache_dir=root, steps=0, progress=False))


@pytest.mark.parametrize("regime", ["outcome", "process", "distillation", ("outcome", "process", "distillation")],
                         ids=["outcome", "process", "distillation", "mixed"])
def test_trainer_step_in_every_regime_logs_the_diagnostics(tmp_path, judges, regime):
    from test_trainer import _trainer
    prm, teacher = judges
    tr = _trainer(tmp_path, reward_regime=list(regime) if isinstance(regime, tuple) else regime, prm_model=prm,
                  teacher_model=teacher, beta=0.0, inner_updates=1, drop_zero_variance=True)
    before = [p.detach().clone() for p in tr.engine.bank.parameters()]
    rows = tr.step(0)
    for a, row in rows.items():
        for k in ("adv_std", "truncated_frac", "response_len"):
            assert math.isfinite(row[k]), (a, k, row[k])
        assert 0 <= row["truncated_frac"] <= 1 and 1 <= row["response_len"] <= tr.cfg.max_new_tokens
        assert row["adv_std"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(tr.engine.bank.parameters(), before))


def test_regime_config_errors():
    from lora_engine.rl.config import config_from_dict
    with pytest.raises(ValueError, match="reward_regime must be one of"):
        config_from_dict({"adapters": [{"rank": 1}], "reward_regime": "prm"})
    with pytest.raises(ValueError, match="reward_regime has 2 entries for 1 adapters"):
        config_from_dict({"adapters": [{"rank": 1}], "reward_regime": ["outcome", "process"]})
    with pytest.raises(ValueError, match="dense_threshold must be in"):
        config_from_dict({"adapters": [{"rank": 1}], "dense_threshold": 1.0})
    with pytest.raises(ValueError, match="prm_kind must be one of"):
        config_from_dict({"adapters": [{"rank": 1}], "prm_kind": "orm"})
    with pytest.raises(ValueError, match="TrainConfig.prm_model must be a string"):
        config_from_dict({"adapters": [{"rank": 1}], "prm_model": 3})


def test_ppo_takes_the_regimes_token_rewards(tmp_path, judges, monkeypatch):
    from lora_engine.rl import ppo_step
    from test_ppo_trainer import _ppo
    prm, teacher = judges
    tr = _ppo(tmp_path, reward_regime=["outcome", "process", "distillation"], prm_model=prm, teacher_model=teacher,
              beta=0.0)
    seen, real = {}, ppo_step.ppo.gae

    def gae(rewards, values, mask, *args):  # record the per-token rewards PPO's GAE receives
        seen.update(r=rewards.clone(), m=mask.clone())
        return real(rewards, values, mask, *args)
    monkeypatch.setattr(ppo_step.ppo, "gae", gae)
    rows = tr.step(0)
    assert all(math.isfinite(row["adv_std"]) for row in rows.values())
    ids = tr.rollout(0)[2].adapter_ids  # the same draw as the step's (seeded per adapter and step)
    r, m = seen["r"], seen["m"].bool()
    placed = (r != 0) & m
    per_row = placed.sum(1)
    assert (per_row[ids == 0] <= 1).all()                                   # outcome: the last token only
    assert (placed[ids == 2] == m[ids == 2]).float().mean() > 0.9            # distillation: (almost) every token
    assert ((r[ids == 1] >= 0) & (r[ids == 1] <= 1)).all()                   # process: PRM scores in [0, 1]
