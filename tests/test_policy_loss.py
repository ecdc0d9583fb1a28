"""Policy loss per adapter: Triton vs the fp64 reference, reference vs an independent formula,
parity with TRL's own GRPOTrainer loss, edge cases, isolation, errors, and the fused path.

On a CPU the Triton kernels run in the interpreter with BLOCK_L=16 and BLOCK_B=4, so L=37 and
B=11 cross several blocks. fp32/fp16 here; bf16 in the `gpu` tests.
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import lora_engine as le
from helpers import assert_close
from lora_engine.kernels.logprobs import token_logprobs_naive
from lora_engine.kernels.policy_loss import METRIC_NAMES, policy_loss_naive, policy_loss_triton

SHAPES = [
    # (B, L, A, pattern)
    pytest.param(11, 37, 3, "random", id="B11-L37-A3"),
    pytest.param(6, 20, 2, "masked-row", id="fully-masked-row"),
    pytest.param(7, 16, 4, "empty-adapter", id="adapter-without-sequences"),
    pytest.param(3, 1, 1, "random", id="L1-single-adapter"),
]

CONFIGS = [
    # (loss_type, importance_level, delta, beta, with_ref)
    pytest.param(("grpo", "token", None, 0.0, False), id="grpo"),
    pytest.param(("bnpo", "token", None, 0.04, True), id="bnpo-kl"),
    pytest.param(("dr_grpo", "token", 1.5, 0.0, True), id="dr_grpo-delta-refnokl"),
    pytest.param(("dapo", "token", 1.5, 0.1, True), id="dapo-delta-kl"),
    pytest.param(("grpo", "sequence", None, 0.1, True), id="gspo-grpo-kl"),
    pytest.param(("dapo", "sequence", 1.2, 0.0, False), id="gspo-dapo-delta"),
    pytest.param(("dr_grpo", "sequence", None, 0.04, True), id="gspo-dr_grpo-kl"),
    pytest.param(("bnpo", "sequence", 1.5, 0.0, False), id="gspo-bnpo-delta"),
]


def _make(B, L, A, pattern, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(B, L, generator=g) * 0.5 - 2.0
    # log-ratios of std 0.3: ratios from ~0.4 to ~2.5, so every clip region and delta are hit
    old = logp + torch.randn(B, L, generator=g) * 0.3
    ref = logp + torch.randn(B, L, generator=g) * 0.3
    mask = torch.rand(B, L, generator=g) > 0.25
    mask[:, 0] = True
    adv = torch.randn(B, generator=g)
    ids = torch.randint(0, A, (B,), generator=g)
    if pattern == "masked-row":
        mask[1] = False
    elif pattern == "empty-adapter":
        ids[ids == 1] = 0
    return logp, old, ref, mask, adv, ids


def _loss_and_grad(fn, logp, old, ref, mask, adv, ids, A, cfg, dtype, g_out, mcl=None):
    loss_type, level, delta, beta, with_ref = cfg
    x = logp.to(dtype).detach().requires_grad_()
    cast = (lambda t: t.double()) if dtype == torch.float64 else (lambda t: t)
    losses, metrics = fn(x, cast(old), cast(adv), mask, ids, ref_logp=cast(ref) if with_ref else None,
                         loss_type=loss_type, eps_low=0.2, eps_high=0.28, delta=delta, beta=beta,
                         importance_level=level, num_adapters=A, max_completion_length=mcl)
    (losses * g_out.to(losses.dtype)).sum().backward()
    return losses, metrics, x.grad


# --- an independent formula: vectorised with one-hot adapter matrices, no per-adapter loop ----

def _formula(logp, old, adv, mask, ids, ref, loss_type, eps_low, eps_high, delta, beta, level, A,
             mcl=None):
    m = mask.double()
    on = m != 0
    lr = (logp - old) * on
    if level == "sequence":
        lr = ((lr * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)).expand_as(m)
    r = lr.exp()
    r1 = r if delta is None else torch.minimum(r, torch.full_like(r, delta))
    r2 = r.clamp(1 - eps_low, 1 + eps_high)
    a = adv[:, None]
    loss_tok = -torch.minimum(r1 * a, r2 * a)
    kl = torch.zeros_like(m)
    if ref is not None:
        diff = (ref - logp) * on
        kl = diff.exp() - diff - 1
        loss_tok = loss_tok + beta * kl
    onehot = torch.nn.functional.one_hot(ids, A).double()  # [B, A]
    n_seq = onehot.sum(0)
    row = (loss_tok * m).sum(1)
    tok = onehot.t() @ m.sum(1)
    if loss_type == "grpo":
        losses = (onehot.t() @ (row / m.sum(1).clamp(min=1))) / n_seq.clamp(min=1)
    elif loss_type == "dr_grpo":
        losses = (onehot.t() @ row) / (n_seq * (m.shape[1] if mcl is None else mcl)).clamp(min=1)
    else:
        losses = (onehot.t() @ row) / tok.clamp(min=1)
    low = ((r1 < 1 - eps_low) & (a < 0)).double() * m
    high = ((r1 > 1 + eps_high) & (a > 0)).double() * m
    per_a = lambda t: (onehot.t() @ t.sum(1)) / tok.clamp(min=1)
    metrics = dict(clip_frac_low=per_a(low), clip_frac_high=per_a(high),
                   clip_frac=per_a(torch.maximum(low, high)), kl_mean=per_a(kl.detach() * m),
                   ratio_mean=per_a(r.detach() * m))
    return losses, metrics


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("B,L,A,pattern", SHAPES[:3])
@pytest.mark.parametrize("mcl_extra", [pytest.param(None, id="mcl-None"), pytest.param(9, id="mcl-L+9")])
def test_reference_matches_independent_formula(B, L, A, pattern, cfg, mcl_extra):
    logp, old, ref, mask, adv, ids = _make(B, L, A, pattern)
    mcl = None if mcl_extra is None else L + mcl_extra
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(1)).double()
    losses, metrics, grad = _loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids, A,
                                           cfg, torch.float64, g_out, mcl=mcl)
    loss_type, level, delta, beta, with_ref = cfg
    x = logp.double().requires_grad_()
    f_losses, f_metrics = _formula(x, old.double(), adv.double(), mask, ids,
                                   ref.double() if with_ref else None, loss_type, 0.2, 0.28,
                                   delta, beta, level, A, mcl=mcl)
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
    logp, old, ref, mask, adv, ids = _make(B, L, A, pattern)
    logp = logp.to(dtype)
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(1))
    losses, metrics, grad = _loss_and_grad(policy_loss_triton, logp, old, ref, mask, adv, ids, A,
                                           cfg, dtype, g_out)
    r_losses, r_metrics, r_grad = _loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids,
                                                 A, cfg, torch.float64, g_out)
    assert losses.dtype == torch.float32 and grad.dtype == dtype
    assert_close(losses, r_losses, dtype, "losses")
    assert_close(grad, r_grad, dtype, "dlogp")
    for k in METRIC_NAMES:
        assert metrics[k].shape == (A,)
        assert_close(metrics[k], r_metrics[k], dtype, k)


DR_GRPO_CONFIGS = [c for c in CONFIGS if c.values[0][0] == "dr_grpo"]


@pytest.mark.parametrize("cfg", DR_GRPO_CONFIGS)
@pytest.mark.parametrize("B,L,A,pattern", SHAPES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
def test_triton_matches_reference_with_max_completion_length(B, L, A, pattern, cfg, dtype):
    """dr_grpo with max_completion_length > L: both paths divide by n_seq_a * max_completion_length."""
    logp, old, ref, mask, adv, ids = _make(B, L, A, pattern)
    logp = logp.to(dtype)
    mcl = L + 11
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(1))
    losses, metrics, grad = _loss_and_grad(policy_loss_triton, logp, old, ref, mask, adv, ids, A,
                                           cfg, dtype, g_out, mcl=mcl)
    r_losses, r_metrics, r_grad = _loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids,
                                                 A, cfg, torch.float64, g_out, mcl=mcl)
    assert_close(losses, r_losses, dtype, "losses")
    assert_close(grad, r_grad, dtype, "dlogp")
    for k in METRIC_NAMES:
        assert_close(metrics[k], r_metrics[k], dtype, k)
    # and it is exactly the L-normalised loss rescaled by L / max_completion_length
    l_losses, _, l_grad = _loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids, A, cfg,
                                         torch.float64, g_out)
    assert_close(r_losses, l_losses * L / mcl, torch.float64, "rescaled losses")
    assert_close(r_grad, l_grad * L / mcl, torch.float64, "rescaled dlogp")


@pytest.mark.parametrize("fn,dtype", [pytest.param(policy_loss_naive, torch.float64, id="naive-fp64"),
                                      pytest.param(policy_loss_triton, torch.float32, id="triton-fp32")])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
def test_max_completion_length_only_affects_dr_grpo(fn, dtype, loss_type):
    logp, old, ref, mask, adv, ids = _make(7, 13, 2, "random", seed=8)
    args = (logp.to(dtype), old.to(dtype), adv.to(dtype), mask, ids)
    a, _ = fn(*args, loss_type=loss_type)
    b, _ = fn(*args, loss_type=loss_type, max_completion_length=40)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fn,dtype", [pytest.param(policy_loss_naive, torch.float64, id="naive-fp64"),
                                      pytest.param(policy_loss_triton, torch.float32, id="triton-fp32")])
def test_max_completion_length_equal_to_L_is_the_default(fn, dtype):
    logp, old, ref, mask, adv, ids = _make(7, 13, 2, "random", seed=8)
    args = (logp.to(dtype), old.to(dtype), adv.to(dtype), mask, ids)
    a, _ = fn(*args, loss_type="dr_grpo")
    b, _ = fn(*args, loss_type="dr_grpo", max_completion_length=13)
    assert torch.equal(a, b)


# --- parity with TRL's GRPOTrainer._compute_loss (called, not transcribed) -------------------

class _TRLTrainerStub:
    """The attributes GRPOTrainer._compute_loss reads (trl 1.16), for one process, no vLLM,
    no entropy mask/bonus, train mode, gradient accumulation 1."""

    def __init__(self, logp, loss_type, level, eps_low, eps_high, delta, beta, L):
        self._logp = logp
        self.loss_type = loss_type
        self.importance_sampling_level = level
        self.epsilon_low, self.epsilon_high, self.beta = eps_low, eps_high, beta
        self.args = SimpleNamespace(delta=delta, use_bias_correction_kl=False, steps_per_generation=1)
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.aux_loss_enabled = False
        self._entropy_bonus_enabled = False
        self.max_completion_length = L
        self.current_gradient_accumulation_steps = 1
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(num_processes=1, gather=lambda t: t,
                                           gather_for_metrics=lambda t: t,
                                           reduce=lambda t, reduction="sum": t)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logp, torch.zeros_like(self._logp), None


TRL_CONFIGS = [
    pytest.param(lt, lvl, delta, beta, id=f"{lt}-{lvl}-{'delta' if delta else 'nodelta'}-beta{beta}")
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
    for lvl, delta, beta in (("token", None, 0.0), ("token", 1.4, 0.04), ("sequence", None, 0.04))
]


@pytest.mark.parametrize("loss_type,level,delta,beta", TRL_CONFIGS)
def test_parity_with_trl_grpo_trainer(loss_type, level, delta, beta):
    _check_trl_parity(loss_type, level, delta, beta, mcl=None)


@pytest.mark.parametrize("loss_type,level,delta,beta",
                         [p for p in TRL_CONFIGS if p.values[0] == "dr_grpo"])
def test_parity_with_trl_dr_grpo_max_completion_length(loss_type, level, delta, beta):
    """TRL's dr_grpo divides by its config's max_completion_length, here 13 + 19 > L = 13."""
    _check_trl_parity(loss_type, level, delta, beta, mcl=13 + 19)


def _check_trl_parity(loss_type, level, delta, beta, mcl):
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    B, L = 6, 13
    logp, old, ref, mask, adv, _ = _make(B, L, 1, "masked-row", seed=3)
    logp, old, ref, adv = logp.double(), old.double(), ref.double(), adv.double()
    ids = torch.zeros(B, dtype=torch.long)

    x_trl = logp.clone().requires_grad_()
    stub = _TRLTrainerStub(x_trl, loss_type, level, 0.2, 0.28, delta, beta, L if mcl is None else mcl)
    inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long),
                  prompt_mask=torch.ones(B, 1, dtype=torch.long),
                  completion_ids=torch.zeros(B, L, dtype=torch.long), completion_mask=mask.long(),
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=mask.sum())
    trl_loss = grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    trl_loss.backward()

    for fn, dtype in ((policy_loss_naive, torch.float64), (policy_loss_triton, torch.float32)):
        x = logp.detach().to(dtype).requires_grad_()
        losses, metrics = fn(x, old, adv, mask, ids, ref_logp=ref, loss_type=loss_type,
                             eps_low=0.2, eps_high=0.28, delta=delta, beta=beta, importance_level=level,
                             max_completion_length=mcl)
        losses.sum().backward()
        assert_close(losses[0], trl_loss.detach(), dtype, f"{fn.__name__} loss vs TRL")
        assert_close(x.grad, x_trl.grad, dtype, f"{fn.__name__} dlogp vs TRL")
        got = stub._metrics["train"]
        if beta != 0:
            trl_kl = torch.tensor(got["kl"][-1], dtype=torch.float64)
            assert_close(metrics["kl_mean"][0], trl_kl, dtype, "kl vs TRL")
        if level == "token":  # at sequence level TRL weighs sequences equally, we weigh tokens
            for ours, theirs in (("clip_frac_low", "clip_ratio/low_mean"),
                                 ("clip_frac_high", "clip_ratio/high_mean"),
                                 ("clip_frac", "clip_ratio/region_mean")):
                assert abs(float(metrics[ours][0]) - got[theirs][-1]) < 1e-6, ours


# --- edge cases ----------------------------------------------------------------------------

FNS = [pytest.param(policy_loss_naive, torch.float64, id="naive-fp64"),
       pytest.param(policy_loss_triton, torch.float32, id="triton-fp32")]


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
def test_adapter_with_zero_tokens(fn, dtype):
    """Adapter 1: sequences but no masked tokens; adapter 2: no sequences at all."""
    logp, old, ref, mask, adv, _ = _make(5, 12, 3, "random", seed=2)
    ids = torch.tensor([0, 1, 0, 1, 0])
    mask[ids == 1] = False
    logp[ids == 1] = float("nan")  # garbage at masked positions must not leak
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        x = logp.detach().to(dtype).requires_grad_()
        losses, metrics = fn(x, old.to(dtype), adv.to(dtype), mask, ids, ref_logp=ref.to(dtype),
                             loss_type=loss_type, beta=0.1, num_adapters=3)
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(x.grad).all()
        assert losses[1] == 0 and losses[2] == 0
        assert (x.grad[ids == 1] == 0).all()
        for k in METRIC_NAMES:
            assert torch.isfinite(metrics[k]).all() and metrics[k][1] == 0 and metrics[k][2] == 0, k


@pytest.mark.parametrize("fn,dtype", FNS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_isolation_adding_adapters(fn, dtype, loss_type):
    """Adapter 0's loss, metrics and gradient are unchanged when other adapters' sequences are
    interleaved into the batch."""
    logp, old, ref, mask, adv, _ = _make(12, 19, 3, "random", seed=4)
    ids = torch.tensor([0, 1, 2, 0, 0, 2, 1, 1, 0, 2, 2, 0])
    mine = ids == 0
    kw = dict(loss_type=loss_type, beta=0.05, delta=1.5)
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
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_isolation_when_other_adapters_are_longer(fn, dtype, loss_type, level):
    """Adapter 0's completions are L0=9 wide alone; in the mixed batch another adapter's are 21
    wide, so adapter 0's rows are padded (mask 0, garbage log-probs) to 21. With a fixed
    max_completion_length (the generation cap) adapter 0's loss, metrics and gradient are
    identical; dr_grpo normalised by the padded width would not be."""
    L0, L1, cap = 9, 21, 32
    g = torch.Generator().manual_seed(9)
    logp, old, ref, mask, adv, _ = _make(10, L1, 2, "random", seed=9)
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
    logp, old, ref, mask, adv, ids = _make(5, 10, 2, "random", seed=5)
    outs = [fn(logp.to(dtype), old, adv, m, ids, loss_type="grpo")[0]
            for m in (mask, mask.int(), mask.to(dtype))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def _bad_policy_inputs():
    logp, old, ref, mask, adv, ids = _make(4, 6, 2, "random")
    return [
        pytest.param(dict(old_logp=old[:, :5]), "old_logp", id="old-shape"),
        pytest.param(dict(advantages=adv[:, None].expand(4, 6)), r"advantages must be", id="adv-per-token"),
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
    ]


@pytest.mark.parametrize("override,needle", _bad_policy_inputs())
@pytest.mark.parametrize("fn", [pytest.param(policy_loss_naive, id="naive"),
                                pytest.param(policy_loss_triton, id="triton")])
def test_errors(fn, override, needle):
    logp, old, ref, mask, adv, ids = _make(4, 6, 2, "random")
    kw = dict(logp=logp, old_logp=old, advantages=adv, mask=mask, adapter_ids=ids)
    kw.update(override)
    with pytest.raises(ValueError, match=needle):
        fn(**kw)


def test_triton_rejects_fp64():
    logp, old, ref, mask, adv, ids = _make(4, 6, 2, "random")
    with pytest.raises(ValueError, match="policy_loss_naive"):
        policy_loss_triton(logp.double(), old, adv, mask, ids)


def test_ops_policy_loss_passes_max_completion_length():
    logp, old, ref, mask, adv, ids = _make(5, 10, 2, "random", seed=5)
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
    _, old, ref, mask, adv, ids = _make(B, L, A, "masked-row", seed=7)
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
    logp, old, ref, mask, adv, ids = (t.cuda() for t in _make(B, L, A, "masked-row"))
    logp = logp.to(dtype)
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(1)).cuda()
    losses, metrics, grad = _loss_and_grad(policy_loss_triton, logp, old, ref, mask, adv, ids, A,
                                           cfg, dtype, g_out)
    r_losses, r_metrics, r_grad = _loss_and_grad(policy_loss_naive, logp, old, ref, mask, adv, ids,
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
    _, old, ref, mask, adv, ids = (t.cuda() for t in _make(B, L, A, "masked-row", seed=7))
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
