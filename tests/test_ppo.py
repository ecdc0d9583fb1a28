"""PPO's critic-side math against independent fp64 formulas: GAE, returns, per-adapter whitening,
the clipped value loss, the KL penalty in the reward; isolation between adapters."""
import math

import pytest
import torch

from helpers import assert_close
from lora_engine.rl import ppo


def _batch(B=5, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 3, 1, 0, 6][:B])
    mask = (torch.arange(L)[None] < lengths[:, None]).float()
    mask[0, 4] = 0.0  # a hole inside a row (a tool/observation token): the recurrence skips it
    return (torch.randn(B, L, generator=g), torch.randn(B, L, generator=g), mask,
            torch.tensor([0, 1, 0, 1, 2][:B]))


def _gae_reference(r, v, m, gamma, lam):
    """Per row, over its valid positions only: delta_k = r_k + gamma V_{k+1} - V_k (V past the end 0),
    A_k = sum_{j >= k} (gamma lam)^(j - k) delta_j, R_k = A_k + V_k."""
    adv, ret = torch.zeros_like(r, dtype=torch.float64), torch.zeros_like(r, dtype=torch.float64)
    for b in range(r.shape[0]):
        idx = [t for t in range(r.shape[1]) if m[b, t] > 0]
        vals = [float(v[b, t]) for t in idx] + [0.0]
        deltas = [float(r[b, t]) + gamma * vals[k + 1] - vals[k] for k, t in enumerate(idx)]
        for k, t in enumerate(idx):
            a = sum((gamma * lam) ** (j - k) * deltas[j] for j in range(k, len(idx)))
            adv[b, t], ret[b, t] = a, a + vals[k]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [pytest.param(1.0, 1.0, id="g1-l1"), pytest.param(0.99, 0.95, id="g.99-l.95"),
                                       pytest.param(1.0, 0.0, id="td0"), pytest.param(0.5, 1.0, id="g.5")])
def test_gae_and_returns_equal_the_fp64_formula(gamma, lam):
    r, v, m, _ = _batch()
    adv, ret = ppo.gae(r, v, m, gamma, lam)
    want_adv, want_ret = _gae_reference(r, v, m, gamma, lam)
    assert_close(adv, want_adv, torch.float32, "advantages")
    assert_close(ret, want_ret, torch.float32, "returns")
    assert bool((adv[m == 0] == 0).all()) and bool((ret[m == 0] == 0).all())


def test_gae_with_lam_1_and_zero_values_is_the_return_to_go():
    r, _, m, _ = _batch()
    adv, ret = ppo.gae(r, torch.zeros_like(r), m, 1.0, 1.0)
    want = torch.stack([(r[b] * m[b]).flip(0).cumsum(0).flip(0) for b in range(r.shape[0])]) * m
    assert_close(adv, want, torch.float32, "A")
    assert_close(ret, want, torch.float32, "R")


def test_outcome_rewards_sit_on_the_last_valid_token_and_kl_joins_them():
    _, _, m, _ = _batch()
    scores = torch.tensor([1.0, -1.0, 0.5, 2.0, 3.0])
    r = ppo.outcome_token_rewards(scores, m)
    assert r[0, 8] == 1.0 and r[1, 2] == -1.0 and r[2, 0] == 0.5 and r[4, 5] == 3.0
    assert float(r[3].abs().sum()) == 0.0 and float(r.sum()) == 3.5  # an empty row has no token to hold it
    logp, ref = -torch.rand(5, 9), -torch.rand(5, 9)
    got = ppo.kl_in_reward(r, logp, ref, m, beta=0.05)
    assert_close(got, (r.double() - 0.05 * (logp.double() - ref.double()) * m), torch.float32, "r - beta kl")


@pytest.mark.parametrize("kind", ppo.KL_KINDS)
def test_kl_kinds(kind):
    logp, ref = -torch.rand(3, 4, dtype=torch.float64) * 3, -torch.rand(3, 4, dtype=torch.float64) * 3
    d = logp - ref
    want = {"kl": d, "abs": d.abs(), "mse": 0.5 * d * d,
            "low_var_kl": (torch.exp(ref - logp) - (ref - logp) - 1).clamp(-10, 10)}[kind]
    assert_close(ppo.kl_penalty(logp, ref, kind), want, torch.float64, kind)


def test_whiten_per_adapter_with_bessel_correction():
    x, _, m, ids = _batch()
    got = ppo.whiten(x, m, ids, 3)
    for a in range(3):
        rows = ids == a
        vals = x[rows][m[rows] > 0].double()
        if vals.numel() > 1:
            want = (vals - vals.mean()) / math.sqrt(vals.var(unbiased=True) + 1e-8)
        else:
            want = vals - vals.mean()
        assert_close(got[rows][m[rows] > 0], want, torch.float32, f"adapter {a}")
    kept_mean = ppo.whiten(x, m, ids, 3, shift_mean=False)
    assert_close(kept_mean[ids == 0][m[ids == 0] > 0].mean(), x[ids == 0][m[ids == 0] > 0].mean(), torch.float32)


@pytest.mark.parametrize("clip", [None, 0.2, 0.05])
def test_value_loss_equals_the_formula_and_is_isolated(clip):
    v_new, v_old, m, ids = _batch()
    ret = v_old + torch.randn_like(v_old) * 0.5
    v_new = v_new.clone().requires_grad_()
    loss, frac = ppo.value_loss(v_new, v_old, ret, m, ids, 3, clip)
    for a in range(3):
        rows, sel = ids == a, (m > 0) & (ids == a)[:, None]
        vp, vo, rr = v_new.detach()[sel].double(), v_old[sel].double(), ret[sel].double()
        l1 = (vp - rr) ** 2
        l2 = ((vo + (vp - vo).clamp(-clip, clip) - rr) ** 2) if clip else l1
        want = 0.5 * torch.maximum(l1, l2).mean() if sel.any() else torch.tensor(0.0, dtype=torch.float64)
        assert_close(loss[a].reshape(1), want.reshape(1), torch.float32, f"loss {a}")
        if clip and sel.any():
            assert abs(float(frac[a]) - float((l2 > l1).double().mean())) < 1e-6
    # Isolation: adapter 0's loss and gradient do not see adapter 1's or 2's rows.
    loss[0].backward()
    g_all = v_new.grad.clone()
    only = ids == 0
    v0 = v_new.detach()[only].clone().requires_grad_()
    loss0, _ = ppo.value_loss(v0, v_old[only], ret[only], m[only], ids[only], 3, clip)
    loss0[0].backward()
    assert_close(loss0[0].reshape(1), loss[0].detach().reshape(1), torch.float32, "alone")
    assert_close(v0.grad, g_all[only], torch.float32, "grad alone")
    assert float(g_all[~only].abs().sum()) == 0.0


def test_bad_inputs_are_clear_errors():
    r, v, m, ids = _batch()
    with pytest.raises(ValueError, match="gamma and lam"):
        ppo.gae(r, v, m, gamma=1.5)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        ppo.gae(r[:, :3], v, m)
    with pytest.raises(ValueError, match="unknown kl kind"):
        ppo.kl_penalty(r, v, "k9")
    with pytest.raises(ValueError, match="value_clip"):
        ppo.value_loss(v, v, r, m, ids, 3, clip=-1.0)
