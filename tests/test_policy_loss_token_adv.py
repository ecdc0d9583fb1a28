"""Per-token advantages [B, L] (token-level rewards, PPO's GAE) in the policy loss: the reference
vs the independent fp64 formula, Triton vs the reference (loss, metrics, dlogp), the [B] case as
a constant row, and the combinations that have no per-token meaning (GSPO, vespo) refused."""
import pytest
import torch

from helpers import assert_close
from lora_engine.kernels.policy_loss import METRIC_NAMES, policy_loss_naive, policy_loss_triton
from policy_loss_cases import CONFIGS, FNS, call_kwargs, formula, loss_and_grad, make_inputs

TOKEN_CONFIGS = [c for c in CONFIGS
                 if c.values[0]["importance_level"] == "token" and c.values[0]["loss_type"] != "vespo"]
SHAPES = [pytest.param(11, 37, 3, "random", id="B11-L37-A3"),
          pytest.param(6, 20, 2, "masked-row", id="fully-masked-row")]


def _token_adv(B, L, seed=5):
    # signs vary along a row, so clipping regions differ token by token within one sequence
    return torch.randn(B, L, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", TOKEN_CONFIGS)
@pytest.mark.parametrize("B,L,A,pattern", SHAPES)
def test_reference_matches_formula_with_token_advantages(B, L, A, pattern, cfg):
    logp, old, ref, mask, _, ids = make_inputs(B, L, A, pattern)
    adv = _token_adv(B, L)
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(1)).double()
    losses, metrics, grad = loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids, A, cfg,
                                           torch.float64, g_out)
    x = logp.double().requires_grad_()
    f_losses, f_metrics = formula(x, old.double(), adv.double(), mask, ids, ref.double() if cfg["ref"] else None,
                                  A, **call_kwargs(cfg))
    (f_losses * g_out).sum().backward()
    assert_close(losses, f_losses, torch.float64, "losses")
    assert_close(grad, x.grad, torch.float64, "dlogp")
    for k in METRIC_NAMES:
        assert_close(metrics[k], f_metrics[k], torch.float64, k)


@pytest.mark.parametrize("cfg", TOKEN_CONFIGS)
@pytest.mark.parametrize("B,L,A,pattern", SHAPES)
def test_triton_matches_reference_with_token_advantages(B, L, A, pattern, cfg):
    logp, old, ref, mask, _, ids = make_inputs(B, L, A, pattern)
    adv = _token_adv(B, L)
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(1))
    losses, metrics, grad = loss_and_grad(policy_loss_triton, logp, old, ref, mask, adv, ids, A, cfg,
                                           torch.float32, g_out)
    r_losses, r_metrics, r_grad = loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids, A, cfg,
                                                 torch.float64, g_out)
    assert_close(losses, r_losses, torch.float32, "losses")
    assert_close(grad, r_grad, torch.float32, "dlogp")
    for k in METRIC_NAMES:
        assert_close(metrics[k], r_metrics[k], torch.float32, k)


@pytest.mark.parametrize("fn,dtype", FNS)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo", "sapo"])
def test_constant_rows_equal_sequence_advantages(fn, dtype, loss_type):
    logp, old, ref, mask, adv, ids = make_inputs(9, 21, 2, "random", seed=3)
    results = []
    for a in (adv, adv[:, None].expand(-1, 21).contiguous()):
        x = logp.to(dtype).requires_grad_()
        losses, m = fn(x, old.to(dtype), a.to(dtype), mask, ids, ref_logp=ref.to(dtype), beta=0.05,
                       loss_type=loss_type)
        losses.sum().backward()
        results.append((losses.detach(), x.grad, m))
    (l1, g1, m1), (l2, g2, m2) = results
    assert torch.equal(l1, l2) and torch.equal(g1, g2)
    assert all(torch.equal(m1[k], m2[k]) for k in METRIC_NAMES)


@pytest.mark.parametrize("fn", [policy_loss_naive, policy_loss_triton], ids=["naive", "triton"])
@pytest.mark.parametrize("kw,needle", [
    pytest.param(dict(importance_level="sequence"), "importance_level='token'", id="gspo"),
    pytest.param(dict(loss_type="vespo"), "other than vespo", id="vespo"),
    pytest.param(dict(shape=(4, 3)), r"\[B, L\]", id="wrong-shape"),
])
def test_token_advantages_refused_where_they_have_no_meaning(fn, kw, needle):
    logp, old, _, mask, _, ids = make_inputs(4, 6, 2, "random")
    kw = dict(kw)  # the parametrised dict is shared by both fns
    adv = torch.randn(*kw.pop("shape", (4, 6)))
    with pytest.raises(ValueError, match=needle):
        fn(logp, old, adv, mask, ids, **kw)
