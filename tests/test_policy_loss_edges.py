"""Policy-loss edge cases: ratios exactly on the clip bounds, the corrected KL on-policy, VESPO's
clamps, adapters without tokens or sequences; naive (fp64) and Triton (interpreter, fp32)."""
import pytest
import torch

from helpers import assert_close
from lora_engine.kernels.policy_loss import LOSS_TYPES, METRIC_NAMES, policy_loss_naive, policy_loss_triton
from policy_loss_cases import FNS, formula, loss_and_grad, make_inputs

@pytest.mark.parametrize("fn,dtype", FNS)
@pytest.mark.parametrize("eps,delta", [pytest.param(0.0, None, id="eps0-both-bounds-at-1"),
                                       pytest.param(0.2, 1.0, id="delta-at-1")])
def test_ratio_exactly_on_clip_boundary(fn, dtype, eps, delta):
    """logp == old_logp gives r = 1 exactly (exp(0) is exact everywhere) on the clip bounds /
    delta: clamp passes the gradient at its bounds and min splits ties, so d/dlogp = -A."""
    B, L = 4, 9
    logp = torch.randn(B, L, generator=torch.Generator().manual_seed(0)).to(dtype)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=dtype)
    mask = torch.ones(B, L, dtype=torch.bool)
    x = logp.clone().requires_grad_()
    losses, metrics = fn(x, logp.clone(), adv, mask, torch.zeros(B, dtype=torch.long),
                         loss_type="bnpo", eps_low=eps, eps_high=eps, delta=delta)
    losses.sum().backward()
    assert_close(losses, -adv.mean().reshape(1).to(losses.dtype), dtype, "loss")
    assert_close(x.grad, (-adv[:, None] / (B * L)).expand(B, L), dtype, "dlogp")
    assert float(metrics["clip_frac"][0]) == 0.0


def test_reference_on_nontrivial_clip_boundary_fp64():
    """r = 1 + eps_high and r = 1 - eps_low exactly (eps chosen from r in fp64)."""
    B, L = 4, 5
    lr = torch.tensor([0.15, 0.15, -0.3, -0.3], dtype=torch.float64)
    r = lr.exp()
    eps_high, eps_low = float(r[0]) - 1.0, 1.0 - float(r[2])  # exact: Sterbenz
    old = torch.zeros(B, L, dtype=torch.float64) - 1.0
    x = (old + lr[:, None]).requires_grad_()
    assert torch.equal((x - old).exp()[:, 0], r)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    losses, metrics = policy_loss_naive(x, old, adv, torch.ones(B, L), torch.zeros(B, dtype=torch.long),
                                        loss_type="dapo", eps_low=eps_low, eps_high=eps_high)
    losses.sum().backward()
    expected = -(adv * r)[:, None].expand(B, L) / (B * L)
    assert_close(x.grad, expected, torch.float64, "dlogp on the boundary")
    assert float(metrics["clip_frac"][0]) == 0.0  # strict inequalities: on the bound is not clipped


@pytest.mark.parametrize("fn,dtype", FNS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_corrected_kl_on_policy_changes_the_gradient_not_the_loss(fn, dtype, level):
    """On-policy (logp == old_logp, r = 1) the corrected KL has k3's value but, the ratio being
    differentiable, another gradient (TRL's use_bias_correction_kl doc): with advantages 0 only
    the KL term is left. d/dlp_t [k3(ref - lp) r] = lp_t - ref_t at token level; at sequence
    level (1 - e^(ref_t - lp_t)) + (sum_l k3_l) / n_b, n_b the row's tokens (all masked in)."""
    B, L = 3, 7
    logp, _, ref, _, _, _ = make_inputs(B, L, 1, "random", seed=11)
    logp, ref = logp.to(dtype), ref.to(dtype)
    mask, ids, adv = torch.ones(B, L), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=dtype)
    out = {}
    for corr in (False, True):
        x = logp.clone().requires_grad_()
        losses, metrics = fn(x, logp.clone(), adv, mask, ids, ref_logp=ref, loss_type="bnpo", beta=0.5,
                             importance_level=level, kl_correction=corr)
        losses.sum().backward()
        out[corr] = (losses, metrics["kl_mean"], x.grad)
    d = (ref - logp).double()
    k3 = d.exp() - d - 1
    assert_close(out[True][0], out[False][0], dtype, "loss")
    assert_close(out[True][1], out[False][1], dtype, "kl_mean")
    assert_close(out[False][2], (0.5 * (1 - d.exp()) / (B * L)).to(dtype), dtype, "plain k3 dlogp")
    if level == "token":
        want = 0.5 * -d / (B * L)
    else:
        want = 0.5 * ((1 - d.exp()) + k3.sum(1, keepdim=True) / L) / (B * L)
    assert_close(out[True][2], want.to(dtype), dtype, "corrected dlogp")


@pytest.mark.parametrize("fn,dtype", [pytest.param(policy_loss_naive, torch.float64, id="naive-vs-formula"),
                                      pytest.param(policy_loss_triton, torch.float32, id="triton-vs-naive")])
def test_vespo_clamps(fn, dtype):
    """VESPO's clamps: a token log-ratio of +-25 (clamped to +-20 before the sum), rows whose
    summed log-ratio is above 20 or below log(1e-8) (W clamped), and phi underflowing to 0.

    Row 0 sums +20 and nine -2.2s to +0.2, where an fp32 sum is off by ~1e-6 (ulp(20) = 1.9e-6)
    and phi's relative error is |k - lam W| = 1.7 times that: the kernel sums in fp64 for this."""
    B, L = 6, 10
    logp, old, ref, mask, adv, ids = make_inputs(B, L, 2, "random", seed=12)
    mask[:] = True
    old[0] = logp[0] + 2.2         # nine tokens of log-ratio -2.2 and one of +25, clamped to +20:
    old[0, 3] = logp[0, 3] - 25.0  # row sum +0.2 (unclamped it would be +5.2)
    old[1, 2] = logp[1, 2] + 25.0  # -25 -> -20, then the row sum is below log(1e-8)
    old[2] = logp[2] - 2.5         # row sum 25 > 20: W = e^20, phi = 0
    old[3] = logp[3] - 0.2         # row sum 2: W = e^2
    adv[:4] = torch.tensor([1.0, -1.0, 0.5, -0.7])
    g_out = torch.tensor([0.7, -1.3])
    c = dict(loss_type="vespo", importance_level="token", delta=None, beta=0.0, ref=False)
    losses, _, grad = loss_and_grad(fn, logp, old, ref, mask, adv, ids, 2, c, dtype, g_out)
    assert (grad[2] == 0).all() and (grad[0] != 0).all() and (grad[1] != 0).all()
    if fn is policy_loss_naive:
        x = logp.double().requires_grad_()
        want, _ = formula(x, old.double(), adv.double(), mask, ids, None, 2, loss_type="vespo")
        (want * g_out.double()).sum().backward()
        want_grad = x.grad
    else:
        want, _, want_grad = loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids, 2, c,
                                           torch.float64, g_out)
    assert_close(losses, want, dtype, "losses")
    assert_close(grad, want_grad, dtype, "dlogp")


@pytest.mark.parametrize("fn,dtype", FNS)
def test_adapter_with_zero_tokens(fn, dtype):
    """Adapter 1: sequences but no masked tokens; adapter 2: no sequences at all."""
    logp, old, ref, mask, adv, _ = make_inputs(5, 12, 3, "random", seed=2)
    ids = torch.tensor([0, 1, 0, 1, 0])
    mask[ids == 1] = False
    logp[ids == 1] = float("nan")  # garbage at masked positions must not leak
    for loss_type in LOSS_TYPES:
        x = logp.detach().to(dtype).requires_grad_()
        losses, metrics = fn(x, old.to(dtype), adv.to(dtype), mask, ids, ref_logp=ref.to(dtype),
                             loss_type=loss_type, beta=0.1, num_adapters=3)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(x.grad).all()
        assert losses[1] == 0 and losses[2] == 0
        assert (x.grad[ids == 1] == 0).all()
        for k in METRIC_NAMES:
            assert torch.isfinite(metrics[k]).all() and metrics[k][1] == 0 and metrics[k][2] == 0, k
