"""The bank's fused AdamW: the kernels (vectorised torch, Triton in the interpreter) against the
naive spec, and BankAdamW against torch.optim.AdamW + clip_grad_norm_ run per adapter over
several steps of a mixed bank (ranks, methods, lrs, betas, eps, weight decay, LoRA+), with a
skipped adapter, a NaN, a one-adapter step, adapters added between steps and a state round trip."""
import copy
import math

import pytest
import torch

import lora_engine as le
from helpers import TOL, assert_as_close_as_torch, assert_close
from lora_engine.engine import methods
from lora_engine.engine.optimizer import BankAdamW
from lora_engine.kernels import optim
from models import tiny_model


@pytest.fixture(params=["naive", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", request.param)
    return request.param


# --- kernels against the spec --------------------------------------------------------------

def _kernel_case(seed=0, A=7):
    """Five tensors of the five layouts, odd sizes, ranks 1..9, one slot absent, one inactive with NaN grads."""
    g = torch.Generator().manual_seed(seed)
    ranks = [1, 9, 3, 0, 5, 2, 4][:A]  # slot 3 absent from the ranked tensors
    present = [a for a in range(A) if ranks[a]]
    R = sum(ranks)
    shapes = [((R, 23), 0, ranks), ((17, R), 1, ranks), ((R,), 0, ranks), ((len(present), 19), 0, None),
              ((len(present), 5, 3), 0, None)]
    params, grads, ms, vs, segs = [], [], [], [], []
    for shape, axis, rk in shapes:
        sizes = [rk[a] for a in present] if rk is not None else [1] * len(present)
        offs = [sum(sizes[:j]) for j in range(len(sizes))]
        segs.append(optim.make_segments(axis, offs, sizes, present, "cpu"))
        params.append(torch.randn(shape, generator=g))
        grads.append(torch.randn(shape, generator=g) * 3)
        ms.append(torch.randn(shape, generator=g) * 0.1)
        vs.append(torch.rand(shape, generator=g) * 0.01)
    coef = torch.zeros(len(optim.COEFS), 2, A)
    for k, name in enumerate(optim.COEFS):
        coef[k] = {"active": torch.ones(2, A), "clip": torch.rand(2, A, generator=g),
                   "decay": 1 - 1e-3 * torch.rand(2, A, generator=g), "w1": 0.1 + 0.5 * torch.rand(2, A, generator=g),
                   "beta2": 0.99 + 0.009 * torch.rand(2, A, generator=g),
                   "w2": 1e-3 + 0.01 * torch.rand(2, A, generator=g),
                   "neg_step": -1e-2 * torch.rand(2, A, generator=g), "bc2_sqrt": 0.1 + torch.rand(2, A, generator=g),
                   "eps": 1e-8 + 1e-3 * torch.rand(2, A, generator=g)}[name]
    coef[0, :, 4] = 0  # slot 4 inactive: its NaN gradients must not leak
    for t, seg in zip(grads, segs):
        pos = (seg.owner == 4).nonzero().squeeze(1)
        t.index_fill_(seg.axis, pos, float("nan"))
    return params, grads, ms, vs, segs, [0, 1, 1, 1, 0], coef


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_update_kernels_match_the_reference(impl):
    case = _kernel_case()
    ref = copy.deepcopy(case)
    optim.adamw_update_naive(*ref)
    got = copy.deepcopy(case)
    {"torch": optim.adamw_update_torch, "triton": optim.adamw_update_triton}[impl](*got)
    for j in range(5):
        for name, k in (("param", 0), ("exp_avg", 2), ("exp_avg_sq", 3)):
            assert_close(got[k][j], ref[k][j], torch.float32, f"tensor {j} {name}")
            on = case[4][j].owner == 4  # the inactive slot: bit for bit as it was
            assert torch.equal(got[k][j].index_select(case[4][j].axis, on.nonzero().squeeze(1)),
                               case[k][j].index_select(case[4][j].axis, on.nonzero().squeeze(1)))


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_segmented_norms_match_the_reference(impl):
    params, grads, _, _, segs, _, _ = _kernel_case(seed=1)
    grads[1] = None  # a tensor without a gradient counts nothing
    grads = [None if g is None else torch.nan_to_num(g) for g in grads]
    ref = optim.segment_sumsq_naive(grads, segs, 7)
    got = {"torch": optim.segment_sumsq_torch, "triton": optim.segment_sumsq_triton}[impl](grads, segs, 7)
    assert ref[3] == 0 and got[3] == 0, "an absent slot has norm 0"
    assert_close(got, ref, torch.float32, "per-slot sum of squares")


def test_kernel_bad_input_value_errors():
    params, grads, ms, vs, segs, groups, coef = _kernel_case()
    with pytest.raises(ValueError, match="coef must be"):
        optim.adamw_update_torch(params, grads, ms, vs, segs, groups, coef[:3])
    with pytest.raises(ValueError, match="segments cover"):
        optim.adamw_update_torch(params, grads, ms, vs, segs[::-1], groups, coef)
    with pytest.raises(ValueError, match="fp32"):
        optim.adamw_update_torch([p.double() for p in params], grads, ms, vs, segs, groups, coef)


# --- BankAdamW against torch.optim.AdamW per adapter ---------------------------------------

SPECS = [  # mixed ranks, methods, lrs, betas, eps, weight decay, LoRA+
    dict(rank=1, lr=1e-2, seed=0),
    dict(rank=8, lr=3e-3, seed=1, method="lora_plus", weight_decay=0.1),
    dict(rank=3, lr=1e-2, seed=2, method="dora", betas=(0.8, 0.99), eps=1e-6),
    dict(rank=4, lr=5e-3, seed=3, method="vera", weight_decay=0.01),
    dict(rank=2, lr=2e-3, seed=4, method="pissa", target_modules=("q_proj", "down_proj")),
    dict(rank=5, lr=1e-2, seed=5, method="lora_fa", lora_plus_ratio=2.0, weight_decay=0.05),
    dict(rank=16, lr=1e-3, seed=6, method="rslora", betas=(0.9, 0.95)),
    dict(rank=1, lr=1e-2, seed=7, method="full", target_modules=("v_proj",)),
]


def _bank_and_reference(specs=SPECS):
    own = [{k: v for k, v in s.items() if k not in ("betas", "eps")} for s in specs]  # AdamW's, not the spec's
    engine = le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(**kw) for kw in own])
    opt = BankAdamW.of(engine.bank)
    refs = {}
    for i, s in enumerate(specs):
        spec = engine.adapter_spec(i)
        kw = dict(betas=s.get("betas", (0.9, 0.999)), eps=s.get("eps", 1e-8), weight_decay=spec.weight_decay)
        opt.configure(i, spec.lr, spec.lora_plus_ratio, **kw)
        refs[i] = {}
        for dtype in (torch.float32, torch.float64):
            groups = methods.param_groups(engine, i)
            own = [[torch.nn.Parameter(p.detach().clone().to(dtype)) for p in g["params"]] for g in groups]
            topt = torch.optim.AdamW([{"params": o, "lr": g["lr"]} for o, g in zip(own, groups)], **kw)
            refs[i][dtype] = (topt, [p for o in own for p in o], [p for g in groups for p in g["params"]])
    return engine, opt, refs


def _grads(engine, step, scale_of):
    """Random gradients per adapter, as AdamW sees them: some large (clipped), adapter 2 NaN at step 1."""
    g = torch.Generator().manual_seed(100 + step)
    out = {}
    for i in engine.adapter_ids:
        out[i] = [torch.randn(p.shape, generator=g) * scale_of(i) for p in methods.param_groups(engine, i)[0]["params"]
                  + methods.param_groups(engine, i)[1]["params"]]
        if i == 2 and step == 1:
            out[i][0].view(-1)[0] = float("nan")
    return out


def _step_reference(refs, grads, i, max_norm, skip):
    for dtype, (topt, own, _) in refs[i].items():
        for p, gr in zip(own, grads[i]):
            p.grad = gr.to(dtype)
        norm = float(torch.nn.utils.clip_grad_norm_(own, max_norm))
        if math.isfinite(norm) and not skip:
            topt.step()
        topt.zero_grad()


@pytest.mark.parametrize("subset", [False, True], ids=["whole-bank", "one-adapter-at-a-time"])
def test_bank_adamw_matches_torch_adamw_per_adapter(backend, subset):
    engine, opt, refs = _bank_and_reference()
    before = {i: [v.detach().clone() for v in refs[i][torch.float32][2]] for i in refs}
    skip_at = {(2, 3)}  # (step, adapter): adapter 3's loss "not finite" at step 2
    for step in range(4):
        grads = _grads(engine, step, scale_of=lambda i: 10.0 if i % 2 else 0.01)
        for i in engine.adapter_ids:
            for view, gr in zip(refs[i][torch.float32][2], grads[i]):
                view.grad = gr
        if subset:
            norms = {i: float(opt.step([i], 1.0, skip=[i] if (step, i) in skip_at else None)[i])
                     for i in engine.adapter_ids}
        else:
            skip = torch.zeros(engine.bank.num_slots, dtype=torch.bool)
            skip[[i for s, i in skip_at if s == step]] = True
            norms = opt.step(max_grad_norm=1.0, skip=skip).tolist()
        opt.zero_grad()
        for i in engine.adapter_ids:
            _step_reference(refs, grads, i, 1.0, (step, i) in skip_at)
        assert math.isnan(norms[2]) == (step == 1), "the NaN adapter's norm is reported as such"
    for i in engine.adapter_ids:
        (t32, own32, views), (t64, own64, _) = refs[i][torch.float32], refs[i][torch.float64]
        for j, (v, p32, p64, b) in enumerate(zip(views, own32, own64, before[i])):
            name = f"adapter {i} ({SPECS[i].get('method', 'lora')}) tensor {j}"
            # The update, against an fp64 AdamW: at most ~2x as far from it as torch's own fp32 run.
            assert_as_close_as_torch(v.detach() - b, p32.detach() - b, p64.detach() - b.double(), torch.float32, name)
            st32, st = t32.state[p32], opt._state_of(v, "exp_avg")
            assert_close(st, st32["exp_avg"], torch.float32, name + " exp_avg")
            assert_close(opt._state_of(v, "exp_avg_sq"), st32["exp_avg_sq"], torch.float32, name + " exp_avg_sq")
        assert opt.steps[i] == int(t32.state[own32[0]]["step"]), f"adapter {i} step count"
    assert opt.steps[2] == 3 and opt.steps[3] == 3 and opt.steps[0] == 4, "NaN and skipped steps are not counted"


def test_skipped_and_unasked_adapters_keep_weights_and_state_bit_for_bit():
    engine, opt, _ = _bank_and_reference()
    for i in engine.adapter_ids:
        for v in engine.adapter_parameters(i):
            v.grad = torch.randn(v.shape)
    opt.step(max_grad_norm=1.0)  # every adapter has state now
    for i in engine.adapter_ids:
        for v in engine.adapter_parameters(i):
            v.grad = torch.randn(v.shape)
    for v in engine.adapter_parameters(4):
        v.grad = torch.full(v.shape, float("inf"))
    snap = lambda i: [t.clone() for v in engine.adapter_parameters(i)  # noqa: E731
                      for t in (v.detach(), opt._state_of(v, "exp_avg"), opt._state_of(v, "exp_avg_sq"))]
    kept = {i: snap(i) for i in (1, 4, 6)}
    norms = opt.step([0, 2, 4, 5], max_grad_norm=1.0, skip=[5])
    assert math.isinf(norms[4]) and math.isnan(norms[1]), "asked-and-infinite vs not asked"
    for i, was in kept.items():
        assert all(torch.equal(a, b) for a, b in zip(snap(i), was)), f"adapter {i} changed"
    assert opt.steps.tolist()[:7] == [2, 1, 2, 1, 1, 1, 1]


def test_state_survives_a_round_trip_and_adapters_added_between_steps():
    engine, opt, _ = _bank_and_reference(SPECS[:3])
    twin, twin_opt, _ = _bank_and_reference(SPECS[:3])
    g = torch.Generator().manual_seed(5)
    steps = [{i: [torch.randn(v.shape, generator=g) for v in engine.adapter_parameters(i)] for i in range(3)}
             for _ in range(3)]

    def run(eng, o, grads):
        for i in range(3):
            for v, gr in zip(eng.adapter_parameters(i), grads[i]):
                v.grad = gr
        o.step([0, 1, 2], max_grad_norm=1.0)
        o.zero_grad()

    run(engine, opt, steps[0])
    run(twin, twin_opt, steps[0])
    saved = {i: opt.state_dict_of(i) for i in range(3)}
    engine.add_adapters([le.AdapterSpec(rank=7, seed=9), le.AdapterSpec(rank=2, method="dora", seed=10)])
    engine.remove_adapter(1)  # buffers laid out again twice: adapter 0 and 2's state must follow them
    for i in (0, 2):
        opt.load_state_dict_of(i, saved[i])  # a no-op if the relayout kept it, as it must
    steps[1][1] = steps[2][1] = None
    for k in (1, 2):
        for i in (0, 2):
            for v, gr in zip(engine.adapter_parameters(i), steps[k][i]):
                v.grad = gr
        opt.step([0, 2], max_grad_norm=1.0)
        opt.zero_grad()
        for i in (0, 2):
            for v, gr in zip(twin.adapter_parameters(i), steps[k][i]):
                v.grad = gr
        twin_opt.step([0, 2], max_grad_norm=1.0)
        twin_opt.zero_grad()
    for i in (0, 2):
        for a, b in zip(engine.adapter_parameters(i), twin.adapter_parameters(i)):
            assert torch.equal(a, b), f"adapter {i} after add/remove and a state round trip"
    with pytest.raises(ValueError, match="not in the bank"):
        opt.step([1])


@pytest.mark.gpu
def test_bank_adamw_compiled_gpu_matches_torch():
    case = [t.cuda() if torch.is_tensor(t) else t for t in _kernel_case()]
    case[4] = [optim.Segments(s.axis, *(x.cuda() for x in s[1:5]), s.max_size) for s in case[4]]
    ref = copy.deepcopy(case)
    optim.adamw_update_naive(*ref)
    optim.adamw_update_triton(*case)
    for j in range(5):
        for k in (0, 2, 3):
            # sqrt/division rounded to nearest as torch's kernels: round-off of fp32 alone.
            assert_close(case[k][j], ref[k][j], torch.float32, f"tensor {j} field {k}")
    assert TOL[torch.float32] > 0
