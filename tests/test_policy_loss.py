"""Policy loss per adapter: Triton vs the fp64 reference, reference vs an independent formula,
edge cases, isolation, errors, and the fused path, for every loss type (TRL parity is in
test_policy_loss_trl.py, the normalisers and micro-batching in test_policy_loss_normalisers.py).

On a CPU the Triton kernels run in the interpreter with BLOCK_L=16 and BLOCK_B=4, so L=37 and
B=11 cross several blocks. fp32/fp16 here; bf16 in the `gpu` tests.
"""
import pytest
import torch

import lora_engine as le
from helpers import assert_close
from lora_engine.kernels.logprobs import token_logprobs_naive
from lora_engine.kernels.policy_loss import LOSS_TYPES, METRIC_NAMES, policy_loss_naive, policy_loss_triton
from policy_loss_cases import CONFIGS, FNS, SHAPES, call_kwargs, formula, loss_and_grad, make_inputs

@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("B,L,A,pattern", SHAPES[:3])
@pytest.mark.parametrize("mcl_extra", [pytest.param(None, id="mcl-None"), pytest.param(9, id="mcl-L+9")])
def test_reference_matches_independent_formula(B, L, A, pattern, cfg, mcl_extra):
    logp, old, ref, mask, adv, ids = make_inputs(B, L, A, pattern)
    mcl = None if mcl_extra is None else L + mcl_extra
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(1)).double()
    losses, metrics, grad = loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids, A,
                                           cfg, torch.float64, g_out, mcl=mcl)
    x = logp.double().requires_grad_()
    f_losses, f_metrics = formula(x, old.double(), adv.double(), mask, ids,
                                  ref.double() if cfg["ref"] else None, A, mcl=mcl, **call_kwargs(cfg))
    (f_losses * g_out).sum().backward()
    assert_close(losses, f_losses, torch.float64, "losses")
    assert_close(grad, x.grad, torch.float64, "dlogp")
    for k in METRIC_NAMES:
        assert_close(metrics[k], f_metrics[k], torch.float64, k)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("B,L,A,pattern", SHAPES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
def test_triton_matches_reference(B, L, A, pattern, cfg, dtype):
    logp, old, ref, mask, adv, ids = make_inputs(B, L, A, pattern)
    logp = logp.to(dtype)
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(1))
    losses, metrics, grad = loss_and_grad(policy_loss_triton, logp, old, ref, mask, adv, ids, A,
                                           cfg, dtype, g_out)
    r_losses, r_metrics, r_grad = loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids,
                                                 A, cfg, torch.float64, g_out)
    assert losses.dtype == torch.float32 and grad.dtype == dtype
    assert_close(losses, r_losses, dtype, "losses")
    assert_close(grad, r_grad, dtype, "dlogp")
    for k in METRIC_NAMES:
        assert metrics[k].shape == (A,)
        assert_close(metrics[k], r_metrics[k], dtype, k)


DR_GRPO_CONFIGS = [c for c in CONFIGS if c.values[0]["loss_type"] == "dr_grpo"]


@pytest.mark.parametrize("cfg", DR_GRPO_CONFIGS)
@pytest.mark.parametrize("B,L,A,pattern", SHAPES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
def test_triton_matches_reference_with_max_completion_length(B, L, A, pattern, cfg, dtype):
    """dr_grpo with max_completion_length > L: both paths divide by n_seq_a * max_completion_length."""
    logp, old, ref, mask, adv, ids = make_inputs(B, L, A, pattern)
    logp = logp.to(dtype)
    mcl = L + 11
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(1))
    losses, metrics, grad = loss_and_grad(policy_loss_triton, logp, old, ref, mask, adv, ids, A,
                                           cfg, dtype, g_out, mcl=mcl)
    r_losses, r_metrics, r_grad = loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids,
                                                 A, cfg, torch.float64, g_out, mcl=mcl)
    assert_close(losses, r_losses, dtype, "losses")
    assert_close(grad, r_grad, dtype, "dlogp")
    for k in METRIC_NAMES:
        assert_close(metrics[k], r_metrics[k], dtype, k)
    # and it is exactly the L-normalised loss rescaled by L / max_completion_length
    l_losses, _, l_grad = loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids, A, cfg,
                                         torch.float64, g_out)
    assert_close(r_losses, l_losses * L / mcl, torch.float64, "rescaled losses")
    assert_close(r_grad, l_grad * L / mcl, torch.float64, "rescaled dlogp")


@pytest.mark.parametrize("fn,dtype", [pytest.param(policy_loss_naive, torch.float64, id="naive-fp64"),
                                      pytest.param(policy_loss_triton, torch.float32, id="triton-fp32")])
@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "dr_grpo"])
def test_max_completion_length_only_affects_dr_grpo(fn, dtype, loss_type):
    logp, old, ref, mask, adv, ids = make_inputs(7, 13, 2, "random", seed=8)
    args = (logp.to(dtype), old.to(dtype), adv.to(dtype), mask, ids)
    a, _ = fn(*args, loss_type=loss_type)
    b, _ = fn(*args, loss_type=loss_type, max_completion_length=40)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fn,dtype", [pytest.param(policy_loss_naive, torch.float64, id="naive-fp64"),
                                      pytest.param(policy_loss_triton, torch.float32, id="triton-fp32")])
def test_max_completion_length_equal_to_L_is_the_default(fn, dtype):
    logp, old, ref, mask, adv, ids = make_inputs(7, 13, 2, "random", seed=8)
    args = (logp.to(dtype), old.to(dtype), adv.to(dtype), mask, ids)
    a, _ = fn(*args, loss_type="dr_grpo")
    b, _ = fn(*args, loss_type="dr_grpo", max_completion_length=13)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fn,dtype", FNS)
@pytest.mark.parametrize("kl_correction", [False, True], ids=["k3", "klcorr"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_isolation_adding_adapters(fn, dtype, loss_type, kl_correction):
    """Adapter 0's loss, metrics and gradient are unchanged when other adapters' sequences are
    interleaved into the batch."""
    logp, old, ref, mask, adv, _ = make_inputs(12, 19, 3, "random", seed=4)
    ids = torch.tensor([0, 1, 2, 0, 0, 2, 1, 1, 0, 2, 2, 0])
    mine = ids == 0
    kw = dict(loss_type=loss_type, beta=0.05, delta=1.5, kl_correction=kl_correction)
    cast = lambda t: t.to(dtype)

    x_alone = cast(logp[mine]).detach().requires_grad_()
    la, ma = fn(x_alone, cast(old[mine]), cast(adv[mine]), mask[mine], ids[mine],
                ref_logp=cast(ref[mine]), **kw)
    la[0].backward()
    x_all = cast(logp).detach().requires_grad_()
    lb, mb = fn(x_all, cast(old), cast(adv), mask, ids, ref_logp=cast(ref), **kw)
    (lb[0] * 1.0).backward()
    if fn is policy_loss_naive:
        assert torch.equal(la[0], lb[0]) and torch.equal(x_alone.grad, x_all.grad[mine])
    assert_close(lb[:1], la, dtype, "loss of adapter 0")
    assert_close(x_all.grad[mine], x_alone.grad, dtype, "grad of adapter 0")
    assert (x_all.grad[~mine] == 0).all()
    for k in METRIC_NAMES:
        assert_close(mb[k][:1], ma[k], dtype, k)


@pytest.mark.parametrize("fn,dtype", FNS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_isolation_when_other_adapters_are_longer(fn, dtype, loss_type, level):
    """Adapter 0's completions are L0=9 wide alone; in the mixed batch another adapter's are 21
    wide, so adapter 0's rows are padded (mask 0, garbage log-probs) to 21. With a fixed
    max_completion_length (the generation cap) adapter 0's loss, metrics and gradient are
    identical; dr_grpo normalised by the padded width would not be."""
    L0, L1, cap = 9, 21, 32
    g = torch.Generator().manual_seed(9)
    logp, old, ref, mask, adv, _ = make_inputs(10, L1, 2, "random", seed=9)
    ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 0, 1])
    mine = ids == 0
    mask[mine, L0:] = False  # adapter 0 completions end by L0; adapter 1 ones run to L1
    mask[~mine, L1 - 1] = True
    logp[mine, L0:] = float("nan")  # padding garbage must not leak
    kw = dict(loss_type=loss_type, beta=0.05, delta=1.5, importance_level=level)
    cast = lambda t: t.to(dtype)

    def adapter0(mcl, alone):
        if alone:
            t = (logp[mine, :L0], old[mine, :L0], adv[mine], mask[mine, :L0], ids[mine], ref[mine, :L0])
        else:
            t = (logp, old, adv, mask, ids, ref)
        x = cast(t[0]).detach().requires_grad_()
        losses, metrics = fn(x, cast(t[1]), cast(t[2]), t[3], t[4], ref_logp=cast(t[5]),
                             max_completion_length=mcl, **kw)
        losses[0].backward()
        grad = x.grad if alone else x.grad[mine, :L0]
        if not alone:
            assert (x.grad[mine, L0:] == 0).all() and (x.grad[~mine] == 0).all()
        return losses[:1].detach(), {k: v[:1] for k, v in metrics.items()}, grad

    la, ma, ga = adapter0(cap, alone=True)
    lb, mb, gb = adapter0(cap, alone=False)
    assert torch.isfinite(lb).all() and torch.isfinite(gb).all()
    # not bitwise: wider rows change the summation tree (fp64 rounding on the naive path)
    assert_close(lb, la, dtype, "loss of adapter 0")
    assert_close(gb, ga, dtype, "grad of adapter 0")
    for k in METRIC_NAMES:
        assert_close(mb[k], ma[k], dtype, k)
    if loss_type == "dr_grpo":  # the defect this guards against: L as the normaliser
        la_w, _, _ = adapter0(None, alone=True)
        lb_w, _, _ = adapter0(None, alone=False)
        assert_close(lb_w * L1 / L0, la_w, dtype, "width-normalised dr_grpo scales with L")
        assert not torch.allclose(lb_w, la_w)


@pytest.mark.parametrize("fn,dtype", FNS)
def test_mask_dtypes_agree(fn, dtype):
    logp, old, ref, mask, adv, ids = make_inputs(5, 10, 2, "random", seed=5)
    outs = [fn(logp.to(dtype), old, adv, m, ids, loss_type="grpo")[0]
            for m in (mask, mask.int(), mask.to(dtype))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def _bad_policy_inputs():
    logp, old, ref, mask, adv, ids = make_inputs(4, 6, 2, "random")
    return [
        pytest.param(dict(old_logp=old[:, :5]), "old_logp", id="old-shape"),
        pytest.param(dict(advantages=adv[:, None].expand(4, 5)), r"advantages must be", id="adv-per-token-width"),
        pytest.param(dict(mask=mask[:3]), "mask", id="mask-shape"),
        pytest.param(dict(adapter_ids=ids.float()), "integer", id="ids-float"),
        pytest.param(dict(adapter_ids=ids - 1), ">= 0", id="ids-negative"),
        pytest.param(dict(num_adapters=1, adapter_ids=torch.tensor([0, 1, 1, 0])), "num_adapters",
                     id="ids-too-large"),
        pytest.param(dict(loss_type="ppo"), "one of", id="unknown-loss-type"),
        pytest.param(dict(importance_level="tok"), "sequence", id="unknown-level"),
        pytest.param(dict(beta=0.1), "ref_logp", id="beta-without-ref"),
        pytest.param(dict(logp=logp[0]), r"\[B, L\]", id="logp-1d"),
        pytest.param(dict(ref_logp=ref.t()), "ref_logp", id="ref-shape"),
        pytest.param(dict(max_completion_length=0), "max_completion_length must be an int", id="mcl-0"),
        pytest.param(dict(max_completion_length=-4), "max_completion_length must be an int", id="mcl-negative"),
        pytest.param(dict(max_completion_length=8.0), "max_completion_length must be an int", id="mcl-float"),
        pytest.param(dict(max_completion_length=True), "max_completion_length must be an int", id="mcl-bool"),
        pytest.param(dict(max_completion_length="8"), "max_completion_length must be an int", id="mcl-str"),
        pytest.param(dict(max_completion_length=5), r"smaller than the completion width L=6.*generation cap",
                     id="mcl-below-L"),
        pytest.param(dict(max_completion_length=5, loss_type="grpo"), "smaller than the completion width",
                     id="mcl-below-L-grpo"),
        pytest.param(dict(loss_type="CISPO"), r"one of \['grpo'.*'vespo'\]", id="loss-type-case"),
        pytest.param(dict(kl_correction="yes"), "kl_correction must be True", id="klcorr-str"),
        pytest.param(dict(kl_correction=1), "use_bias_correction_kl", id="klcorr-int"),
        pytest.param(dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_temperature_neg must be > 0",
                     id="sapo-temp-0"),
        pytest.param(dict(loss_type="sapo", sapo_temperature_pos=-1.0), "sapo_temperature_pos must be > 0",
                     id="sapo-temp-negative"),
        pytest.param(dict(sapo_temperature_pos=float("inf")), "finite number.*1.0", id="sapo-temp-inf"),
        pytest.param(dict(loss_type="vespo", vespo_k_pos=float("nan")), "vespo_k_pos must be a finite",
                     id="vespo-k-nan"),
        pytest.param(dict(loss_type="vespo", vespo_lambda_neg="2"), "vespo_lambda_neg must be a finite.*2.0",
                     id="vespo-lambda-str"),
        pytest.param(dict(loss_type="vespo", vespo_k_neg=True), "vespo_k_neg", id="vespo-k-bool"),
    ]


@pytest.mark.parametrize("override,needle", _bad_policy_inputs())
@pytest.mark.parametrize("fn", [pytest.param(policy_loss_naive, id="naive"),
                                pytest.param(policy_loss_triton, id="triton")])
def test_errors(fn, override, needle):
    logp, old, ref, mask, adv, ids = make_inputs(4, 6, 2, "random")
    kw = dict(logp=logp, old_logp=old, advantages=adv, mask=mask, adapter_ids=ids)
    kw.update(override)
    with pytest.raises(ValueError, match=needle):
        fn(**kw)


def test_triton_rejects_fp64():
    logp, old, ref, mask, adv, ids = make_inputs(4, 6, 2, "random")
    with pytest.raises(ValueError, match="policy_loss_naive"):
        policy_loss_triton(logp.double(), old, adv, mask, ids)


def test_ops_policy_loss_passes_max_completion_length():
    logp, old, ref, mask, adv, ids = make_inputs(5, 10, 2, "random", seed=5)
    got, _ = le.ops.policy_loss(logp, old, adv, mask, ids, loss_type="dr_grpo", max_completion_length=25)
    want, _ = policy_loss_naive(logp.double(), old.double(), adv.double(), mask, ids,
                                loss_type="dr_grpo", max_completion_length=25)
    assert_close(got, want, torch.float32, "ops.policy_loss dr_grpo")
    with pytest.raises(ValueError, match="max_completion_length"):
        le.ops.policy_loss(logp, old, adv, mask, ids, loss_type="dr_grpo", max_completion_length=9)


# --- the fused path: hidden -> loss -> dh ----------------------------------------------------

@pytest.mark.parametrize("loss_type,mcl", [pytest.param("grpo", None, id="grpo"),
                                           pytest.param("dr_grpo", 23, id="dr_grpo-mcl23")])
def test_fused_from_hidden_matches_composition(loss_type, mcl):
    B, L, d, V, A = 5, 9, 24, 50, 2
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(B, L, d, generator=g)
    w = torch.randn(V, d, generator=g) / d ** 0.5
    targets = torch.randint(0, V, (B, L), generator=g)
    _, old, ref, mask, adv, ids = make_inputs(B, L, A, "masked-row", seed=7)
    targets[~mask] = -100  # padding ids are never looked up
    kw = dict(ref_logp=ref, loss_type=loss_type, beta=0.04, delta=1.5, importance_level="token",
              max_completion_length=mcl)
    g_out = torch.randn(A, generator=g)

    h1 = hidden.clone().requires_grad_()
    losses, metrics = le.ops.fused_policy_loss_from_hidden(h1, w, targets, old, adv, mask, ids,
                                                           temperature=0.8, **kw)
    (losses * g_out).sum().backward()

    h2 = hidden.double().requires_grad_()
    logp = token_logprobs_naive(h2, w.double(), targets.clamp(min=0), temperature=0.8)
    r_losses, r_metrics = policy_loss_naive(logp, old.double(), adv.double(), mask, ids,
                                            ref_logp=ref.double(), loss_type=loss_type, beta=0.04,
                                            delta=1.5, max_completion_length=mcl)
    (r_losses * g_out.double()).sum().backward()
    assert_close(losses, r_losses, torch.float32, "losses")
    assert_close(h1.grad, h2.grad, torch.float32, "dh")
    for k in METRIC_NAMES:
        assert_close(metrics[k], r_metrics[k], torch.float32, k)


# --- GPU: compiled kernels, bf16 --------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float32, id="fp32")])
def test_gpu_compiled_matches_reference(cfg, dtype):
    B, L, A = 64, 1500, 5
    logp, old, ref, mask, adv, ids = (t.cuda() for t in make_inputs(B, L, A, "masked-row"))
    logp = logp.to(dtype)
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(1)).cuda()
    losses, metrics, grad = loss_and_grad(policy_loss_triton, logp, old, ref, mask, adv, ids, A,
                                           cfg, dtype, g_out)
    r_losses, r_metrics, r_grad = loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids,
                                                 A, cfg, torch.float64, g_out)
    assert_close(losses, r_losses, dtype, "losses")
    assert_close(grad, r_grad, dtype, "dlogp")
    for k in METRIC_NAMES:
        assert_close(metrics[k], r_metrics[k], dtype, k)


@pytest.mark.gpu
def test_gpu_fused_from_hidden_bf16():
    B, L, d, V, A = 8, 300, 256, 5000, 3
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(B, L, d, generator=g).to(torch.bfloat16).cuda()
    w = (torch.randn(V, d, generator=g) / d ** 0.5).to(torch.bfloat16).cuda()
    targets = torch.randint(0, V, (B, L), generator=g).cuda()
    _, old, ref, mask, adv, ids = (t.cuda() for t in make_inputs(B, L, A, "masked-row", seed=7))
    h1 = hidden.clone().requires_grad_()
    losses, _ = le.ops.fused_policy_loss_from_hidden(h1, w, targets, old, adv, mask, ids,
                                                     loss_type="dapo")
    losses.sum().backward()
    h2 = hidden.double().requires_grad_()
    logp = token_logprobs_naive(h2, w.double(), targets)
    r_losses, _ = policy_loss_naive(logp, old.double(), adv.double(), mask, ids, loss_type="dapo")
    r_losses.sum().backward()
    assert_close(losses, r_losses, torch.bfloat16, "losses")
    assert_close(h1.grad, h2.grad, torch.bfloat16, "dh")
