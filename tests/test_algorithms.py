"""Advantages: hand-computed values, group independence, zero variance, TRL's formula."""
import ast
import importlib.util
import math
import pathlib

import pytest
import torch

from helpers import assert_close
from lora_engine.rl.advantages import (
    deposit_advantages,
    deposit_density,
    group_advantages,
    make_group_ids,
    token_advantages,
    token_returns,
)

EPS = 1e-4


# --- group_advantages: hand-computed ------------------------------------------------------

def test_hand_computed_std_and_none():
    # mean 0.5; unbiased std = sqrt((4 * 0.25) / 3) = sqrt(1/3)
    adv, keep, stats = group_advantages([1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0])
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert_close(adv, torch.tensor([a, -a, -a, a]), torch.float32, "advantages")
    assert keep.tolist() == [True] * 4
    assert stats["n_groups"] == 1 and stats["frac_zero_std"] == 0.0
    assert stats["reward_mean"] == pytest.approx(0.5)

    adv, _, _ = group_advantages([1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], scale="none")
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_interleaved_unequal_groups():
    # group 7: {2, 4} mean 3, std sqrt(2); group 3: {1, 3, 5} mean 3, std 2
    adv, _, stats = group_advantages([2.0, 1.0, 3.0, 4.0, 5.0], [7, 3, 3, 7, 3])
    s7, s3 = math.sqrt(2) + EPS, 2.0 + EPS
    assert_close(adv, torch.tensor([-1 / s7, -2 / s3, 0.0, 1 / s7, 2 / s3]), torch.float32, "advantages")
    assert stats["n_groups"] == 2


def test_adding_another_adapter_changes_nothing():
    g = torch.Generator().manual_seed(0)
    r_a = torch.rand(8, generator=g)
    adv_a, keep_a, _ = group_advantages(r_a, make_group_ids([0] * 8, [0, 0, 0, 0, 1, 1, 1, 1]))
    # adapter 1 answers the same prompts, interleaved with adapter 0's samples
    r_b = torch.rand(8, generator=g) * 10
    r = torch.stack([r_a, r_b], dim=1).reshape(-1)
    ids = make_group_ids([0, 1] * 8, [p for p in [0, 0, 0, 0, 1, 1, 1, 1] for _ in range(2)])
    adv, keep, stats = group_advantages(r, ids)
    assert torch.equal(adv[0::2], adv_a)
    assert torch.equal(keep[0::2], keep_a)
    assert stats["n_groups"] == 4


def test_zero_variance_groups():
    rewards = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    groups = [0, 0, 0, 1, 1, 1]
    adv, keep, stats = group_advantages(rewards, groups)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    assert keep.all()
    assert stats["frac_zero_std"] == 0.5 and stats["n_dropped"] == 0

    adv_d, keep_d, stats_d = group_advantages(rewards, groups, drop_zero_variance=True)
    assert torch.equal(adv_d, adv)
    assert keep_d.tolist() == [False, False, False, True, True, True]
    assert stats_d["n_dropped"] == 3


def test_skipped_samples_leave_the_baseline():
    # None is excluded from mean/std: group {1, 0} -> mean 0.5, std sqrt(0.5)
    adv, keep, stats = group_advantages([1.0, None, 0.0, 2.0], [0, 0, 0, 1], drop_zero_variance=True)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    assert_close(adv, torch.tensor([a, 0.0, -a, 0.0]), torch.float32, "advantages")
    # the one-sample group {2} has no baseline: advantage 0 and dropped as zero-variance
    assert keep.tolist() == [True, False, True, False]
    assert stats["n_skipped"] == 1 and stats["n_dropped"] == 1


def test_make_group_ids_pairs():
    ids = make_group_ids([0, 0, 1, 1, 0], [5, 6, 5, 5, 5])
    assert ids[0] == ids[4] and ids[2] == ids[3]
    assert len({int(ids[0]), int(ids[1]), int(ids[2])}) == 3


@pytest.mark.parametrize("call, match", [
    pytest.param(lambda: group_advantages([1.0, 2.0], [0]), "one id per sample", id="short-ids"),
    pytest.param(lambda: group_advantages([1.0, 2.0], [0, 0], scale="batch"), "unknown scale", id="scale"),
    pytest.param(lambda: group_advantages([1.0, 2.0], [0.0, 1.0]), "integers", id="float-ids"),
    pytest.param(lambda: group_advantages([1.0, float("inf")], [0, 0]), "None", id="inf"),
    pytest.param(lambda: make_group_ids([0, 1], [0]), "one id per sample", id="pair-lengths"),
    pytest.param(lambda: token_returns(torch.ones(2, 3), torch.ones(2, 4)), "shape", id="mask-shape"),
    pytest.param(lambda: token_returns(torch.ones(2, 3), torch.ones(2, 3), gamma=0.0), "gamma", id="gamma"),
])
def test_bad_input_names_the_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- equality with TRL's GRPOTrainer ---------------------------------------------------------

def _nanstd_copy(tensor, dim=None, keepdim=False):
    """Verbatim copy of trl 1.16 ``trl.trainer.utils.nanstd``."""
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    std = torch.sqrt(variance)
    if keepdim:
        return std
    return std.squeeze(dim) if dim is not None else std.squeeze()


def _trl_advantages(rewards, num_generations, scale_rewards, nanstd):
    """TRL's ``_generate_and_score_completions`` advantage lines (sum_then_normalize)."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def _random_rewards(seed, groups=16, gens=8):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (groups * gens,), generator=g).float() * 0.5  # ties: some zero-std groups
    r[torch.rand(r.shape, generator=g) < 0.1] = float("nan")  # skipped samples
    r[:gens] = 1.0  # one group all equal
    return r


@pytest.mark.parametrize("scale, trl_scale", [("std", "group"), ("none", "none")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_trl_formula(scale, trl_scale, seed):
    gens = 8
    r = _random_rewards(seed, gens=gens)
    expected, zero = _trl_advantages(r, gens, trl_scale, _nanstd_copy)
    adv, _, stats = group_advantages(r, torch.arange(r.numel()) // gens, scale=scale)
    assert_close(adv, expected, torch.float32, "advantages vs TRL")
    # TRL's frac_reward_zero_std, when no group is down to one scored sample (NaN std)
    assert stats["frac_zero_std"] == pytest.approx(zero.float().mean().item())


def _installed_trl_file(rel):
    spec = importlib.util.find_spec("trl")  # locates trl without importing it (~8 s)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is not installed")
    return pathlib.Path(spec.submodule_search_locations[0], rel)


def test_trl_copy_is_current():
    """The copies above match the installed trl: nanstd is run from trl's own source."""
    utils = _installed_trl_file("trainer/utils.py").read_text()
    fn = next(n for n in ast.parse(utils).body if isinstance(n, ast.FunctionDef) and n.name == "nanstd")
    fn.returns = None
    for a in fn.args.args + fn.args.kwonlyargs:
        a.annotation = None
    ns = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "trl_nanstd", "exec"), ns)
    r = _random_rewards(3)
    for scale, trl_scale in [("std", "group"), ("none", "none")]:
        expected, _ = _trl_advantages(r, 8, trl_scale, ns["nanstd"])
        adv, _, _ = group_advantages(r, torch.arange(r.numel()) // 8, scale=scale)
        assert_close(adv, expected, torch.float32, f"advantages vs trl's nanstd ({scale})")
    trainer = _installed_trl_file("trainer/grpo_trainer.py").read_text()
    for line in ["advantages = rewards - mean_grouped_rewards",
                 "advantages = advantages / (std_rewards + 1e-4)",
                 "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
                 "advantages = torch.nan_to_num(advantages, nan=0.0)"]:
        assert line in trainer, f"trl's advantage code changed: {line!r} not found"


# --- per-token: return-to-go and dense rewards -------------------------------------------------

def test_token_returns_small_example():
    deposits = torch.tensor([[0.0, 0.5, 0.0, 1.0, 9.0],
                             [0.2, 0.0, 0.3, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0],   # the 9.0 sits under mask 0: ignored
                         [1, 1, 1, 1, 1]])
    assert_close(token_returns(deposits, mask), torch.tensor([[1.5, 1.5, 1.0, 1.0, 0.0],
                                                              [0.5, 0.3, 0.3, 0.0, 0.0]]),
                 torch.float32, "returns")
    # gamma 0.5 on row 0: G3 = 1, G2 = 0.5, G1 = 0.5 + 0.25, G0 = 0.375
    got = token_returns(deposits, mask, gamma=0.5)
    assert_close(got[0], torch.tensor([0.375, 0.75, 0.5, 1.0, 0.0]), torch.float32, "returns, gamma 0.5")


def test_outcome_deposits_reduce_to_group_advantages():
    # one deposit on each row's last token, equal lengths: every token gets the GRPO advantage
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    deposits = torch.zeros(6, 5)
    deposits[:, 3] = rewards
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[:, :4] = True
    placed = torch.zeros(6, 5, dtype=torch.bool)
    placed[:, 3] = True  # a wrong answer's 0 is a deposit too
    for scale in ("none", "std"):
        adv, stats = deposit_advantages(deposits, mask, groups, placed=placed, scale=scale)
        seq_adv, _, _ = group_advantages(rewards, groups, scale=scale)
        assert_close(adv[:, :4], seq_adv[:, None].expand(6, 4), torch.float32, "token vs sequence advantages")
        assert (adv[:, 4] == 0).all()
        assert stats["frac_dense_rows"] == 0.0


def test_dense_and_sparse_groups_share_a_batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    dense = torch.randn(2, 6, generator=g)        # distillation-style, every token
    sparse = torch.zeros(2, 6)
    sparse[0, 2], sparse[0, 5], sparse[1, 3] = 0.5, 1.0, 0.25   # process-style steps
    deposits = torch.cat([dense, sparse])
    groups = torch.tensor([0, 0, 1, 1])
    assert_close(deposit_density(deposits, mask, groups), torch.tensor([1.0, 1.0, 0.25, 0.25]), torch.float32, "density")

    adv, stats = deposit_advantages(deposits, mask, groups)
    alone_dense, _ = token_advantages(dense, mask[:2], [0, 0])
    # sparse (DeepSeekMath 4.1.3): deposits {0.5, 1.0, 0.25} normalised over the group, then summed
    # from each token on (the independent fp64 formula over random batches: test_token_rewards.py)
    d = torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64)
    n = (d - d.mean()) / (d.std() + EPS)
    alone_sparse = torch.zeros(2, 6, dtype=torch.float64)
    alone_sparse[0, :3], alone_sparse[0, 3:] = n[0] + n[1], n[1]
    alone_sparse[1, :4] = n[2]
    assert_close(adv[:2], alone_dense, torch.float32, "dense rows")
    assert_close(adv[2:], alone_sparse, torch.float32, "sparse rows")
    assert stats["frac_dense_rows"] == 0.5


def test_token_advantages_hand_computed():
    # group over valid tokens {1, 1, 3, 3}: mean 2, unbiased std sqrt(4/3)
    values = torch.tensor([[1.0, 1.0, 7.0], [3.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv, _ = token_advantages(values, mask, [4, 4])
    a = 1 / (math.sqrt(4 / 3) + EPS)
    assert_close(adv, torch.tensor([[-a, -a, 0.0], [a, a, 0.0]]), torch.float32, "advantages")
