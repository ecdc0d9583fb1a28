"""PEFT methods beyond plain LoRA: DoRA epilogue kernel, every method's Triton path vs the
reference, parity with PEFT, step-0 equality, LoRA-FA, isolation in a mixed batch,
per-module ranks and target selection, checkpoint round trips."""
import copy

import pytest
import torch

import lora_engine as le
from helpers import TOL, assert_as_close_as_torch, assert_close, rel_rms
from lora_engine.engine import methods, peft_format
from lora_engine.kernels.lora import lora_column_scale_naive, lora_column_scale_triton
from lora_engine.engine.routing import routing_from_token_ids
from models import tiny_model

METHODS = methods.METHODS


@pytest.fixture(params=["naive", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BACKEND", request.param)
    return request.param


def _perturb(engine, seed=1, std=0.05):
    """Move every trainable tensor off its init (B = 0, b = 0, dW = 0 make most methods no-ops)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in engine.adapter_ids:
            for p in engine.adapter_parameters(i):
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * std)


# Three module shapes (64->64, 64->32, 96->64) exercise every code path at a third of the
# interpreter time of all seven projections.
FEW = ("q_proj", "v_proj", "down_proj")


def _all_methods_engine(rank=4, seed=0, targets=FEW):
    specs = [le.AdapterSpec(rank=rank, alpha=8, method=m, seed=i) for i, m in enumerate(METHODS)]
    return le.MultiLoRAModel(tiny_model("qwen3", seed), specs, target_modules=targets)


def _batch(B, L=7, seed=0):
    return torch.randint(0, 97, (B, L), generator=torch.Generator().manual_seed(seed))


def _grads(engine, ids, adapter_ids, seed=7):
    engine.zero_grad(set_to_none=True)
    out = engine(ids, adapter_ids=adapter_ids).logits
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    (out * w).sum().backward()
    grads = {i: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in engine.adapter_parameters(i)]
             for i in engine.adapter_ids}
    return out.detach(), grads


def _fp64_copy(engine, monkeypatch):
    """The same engine, every weight and adapter tensor in fp64: the reference for whole-model
    results, where PyTorch's own fp32 error (many ops, cancellation) exceeds the per-op TOL.
    ``column_norm_sq`` accumulates in fp32 by design; for fp64 weights it keeps fp64."""
    norm_sq = methods.column_norm_sq
    monkeypatch.setattr(methods, "column_norm_sq", lambda w: torch.linalg.vector_norm(w, dim=1).square()
                        if w.dtype == torch.float64 else norm_sq(w))
    return copy.deepcopy(engine).double()


# --- the DoRA column-scale epilogue kernel --------------------------------------------------

SCALE_CASES = [
    # (T, N, flags, pattern, bias)
    pytest.param(63, 97, (True, False, True), "random", True, id="T63-N97-mixed-flags"),
    pytest.param(40, 130, (True, True), "empty-segment", True, id="empty-segment"),
    pytest.param(33, 50, (True,), "all-base", True, id="all-base-only"),
    pytest.param(17, 24, (True, False), "random", False, id="no-bias"),
    pytest.param(31, 36, (False, False), "random", True, id="no-flag-identity"),
]


def _scale_inputs(T, N, flags, pattern, bias, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    A = len(flags)
    y = torch.randn(T, N, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    scale = 1 + 0.2 * torch.randn(A, N, generator=g)
    ids = torch.randint(-1, A, (T,), generator=g)
    if pattern == "empty-segment":
        ids[ids == 1] = 0
    elif pattern == "all-base":
        ids[:] = -1
    cast = lambda t: None if t is None else t.to(device, dtype)
    return cast(y), cast(b), scale.to(device), flags, routing_from_token_ids(ids, A, device)


def _run_scale(fn, y, b, scale, flags, routing, grad_out):
    y = y.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    out = fn(y, b, scale, flags, routing)
    (out.float() * grad_out).sum().backward()
    return out, y.grad, None if b is None else b.grad, scale.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,N,flags,pattern,bias", SCALE_CASES)
def test_column_scale_triton_matches_reference(T, N, flags, pattern, bias, dtype):
    inputs = _scale_inputs(T, N, flags, pattern, bias, dtype)
    grad_out = torch.randn(T, N, generator=torch.Generator().manual_seed(1))
    ref_in = [t.double() if torch.is_tensor(t) else t for t in inputs]
    ref = _run_scale(lora_column_scale_naive, *ref_in, grad_out.double())
    got = _run_scale(lora_column_scale_triton, *inputs, grad_out.to(dtype))
    for name, g, r in zip(["out", "dy", "dbias", "dscale"], got, ref):
        if r is None:
            continue
        if name == "dscale":
            # Rows of unflagged or absent adapters get exactly zero, and the flagged ones the reference.
            assert torch.equal(g == 0, r == 0), "dscale zero pattern"
            if r.abs().sum() == 0:
                continue
        if name == "dbias" and r.abs().sum() == 0:
            assert torch.count_nonzero(g) == 0
            continue
        assert_close(g, r.to(g.dtype), dtype, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("T,N,flags,pattern,bias", SCALE_CASES + [
    pytest.param(4096, 3072, (True, False, True, True), "random", True, id="large"),
])
def test_column_scale_compiled_gpu(T, N, flags, pattern, bias, dtype):
    inputs = _scale_inputs(T, N, flags, pattern, bias, dtype, "cuda")
    grad_out = torch.randn(T, N, generator=torch.Generator().manual_seed(1)).cuda()
    ref_in = [t.double() if torch.is_tensor(t) else t for t in inputs]
    ref = _run_scale(lora_column_scale_naive, *ref_in, grad_out.double())
    got = _run_scale(lora_column_scale_triton, *inputs, grad_out.to(dtype))
    for name, g, r in zip(["out", "dy", "dbias", "dscale"], got, ref):
        if r is None or r.abs().sum() == 0:
            continue
        assert_close(g, r.to(g.dtype), dtype, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_every_method_compiled_gpu(dtype, monkeypatch):
    specs = [le.AdapterSpec(rank=4, alpha=8, method=m, seed=i) for i, m in enumerate(METHODS)]
    ref_engine = le.MultiLoRAModel(tiny_model().cuda(), specs, target_modules=FEW)
    _perturb(ref_engine)
    low = le.MultiLoRAModel(tiny_model(dtype=dtype).cuda(), specs, target_modules=FEW)
    for i in low.adapter_ids:
        peft_format.load_adapter_state(low, i, {n: p.detach() for n, p in ref_engine.bank.named_parameters_of(i).items()})
    ids = _batch(len(METHODS) + 1).cuda()
    adapter_ids = torch.tensor(list(range(len(METHODS))) + [-1])
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "naive")
    ref_out, ref = _grads(ref_engine, ids, adapter_ids)
    own_out, own = _grads(low, ids, adapter_ids)
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "triton")
    out, got = _grads(low, ids, adapter_ids)
    # The Triton path may be at most ~2x as wrong as PyTorch's own path in the same dtype.
    assert rel_rms(out, ref_out) <= 2 * rel_rms(own_out, ref_out) + TOL[dtype] / 2
    for i, m in enumerate(METHODS):
        for j, (g, o, r) in enumerate(zip(got[i], own[i], ref[i])):
            assert rel_rms(g, r) <= 2 * rel_rms(o, r) + TOL[dtype] / 2, f"{m} grad {j}"


def test_column_scale_is_identity_at_scale_one():
    y, b, _, flags, routing = _scale_inputs(63, 97, (True, True), "random", True, torch.float32)
    ones = torch.ones(2, 97)
    assert torch.equal(lora_column_scale_triton(y, b, ones, flags, routing), y)
    assert torch.equal(lora_column_scale_naive(y, b, ones, flags, routing), y)


@pytest.mark.parametrize("fn", [lora_column_scale_naive, lora_column_scale_triton], ids=["naive", "triton"])
def test_column_scale_bad_input(fn):
    y, b, scale, flags, routing = _scale_inputs(16, 12, (True, False), "random", True, torch.float32)
    with pytest.raises(ValueError, match="scale must be"):
        fn(y, b, scale[:, :-1], flags, routing)
    with pytest.raises(ValueError, match="one flag"):
        fn(y, b, scale, flags[:1], routing)
    with pytest.raises(ValueError, match="routing covers"):
        fn(y[:-1], b, scale, flags, routing)


def test_dora_norm_expansion_matches_direct_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 50, generator=g, dtype=torch.float64)
    a, b = torch.randn(6, 50, generator=g, dtype=torch.float64), torch.randn(70, 6, generator=g, dtype=torch.float64)
    direct = torch.linalg.vector_norm(w + 0.3 * b @ a, dim=1)
    got = methods.dora_norm(w, a, b, 0.3, methods.column_norm_sq(w.float()).double())
    assert_close(got, direct, torch.float32, "dora norm")


# --- every method on a model ----------------------------------------------------------------

def test_triton_matches_reference_for_every_method(monkeypatch):
    engine = _all_methods_engine()
    _perturb(engine)
    ids = _batch(len(METHODS) + 1)
    adapter_ids = torch.tensor(list(range(len(METHODS))) + [-1])
    engine64 = _fp64_copy(engine, monkeypatch)
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "naive")
    ref_out, ref = _grads(engine, ids, adapter_ids)
    out64, ref64 = _grads(engine64, ids, adapter_ids)
    monkeypatch.setenv("LORA_ENGINE_BACKEND", "triton")
    out, got = _grads(engine, ids, adapter_ids)
    # Whole model: the Triton path may be at most ~2x as far from fp64 as PyTorch's own fp32 path.
    assert_as_close_as_torch(out, ref_out, out64, torch.float32, "logits")
    for i, m in enumerate(METHODS):
        assert len(got[i]) > 0
        kind_of = {id(p): n.rsplit(".", 1)[1] for n, p in engine.bank.named_parameters_of(i).items()}
        kinds = [kind_of[id(p)] for p in engine.adapter_parameters(i)]
        for j, r in enumerate(ref[i]):
            assert r.abs().sum() > 0, f"{m}: tensor {j} got no gradient"
        # One check per tensor kind over all modules: a rank-4 VeRA lambda_d gradient alone is a
        # 4-number statistic whose fp32 error is summation-order luck (PyTorch's own: 3e-7..1.4e-6).
        for kind in dict.fromkeys(kinds):
            cat = lambda ts: torch.cat([t.flatten() for t, k in zip(ts, kinds) if k == kind])
            assert_as_close_as_torch(cat(got[i]), cat(ref[i]), cat(ref64[i]), torch.float32, f"{m} grad {kind}")


@pytest.mark.parametrize("method", ["pissa", "milora", "dora", "vera", "full", "lora_fa", "lora", "adalora", "miss", "ia3",
                                    "ln_tuning"])
def test_step0_equals_base(method, backend):
    spec = le.AdapterSpec(rank=4, alpha=8, method=method, seed=3)
    engine = le.MultiLoRAModel(tiny_model(), [spec], target_modules=FEW)
    ids = _batch(3)
    with torch.no_grad():
        adapted = engine(ids, adapter_ids=torch.zeros(3, dtype=torch.long)).logits
        base_rows = engine(ids, adapter_ids=torch.full((3,), -1)).logits
        base = engine.model(ids).logits
    # Same code path, same shapes: the adapter's contribution is exactly zero, bit for bit.
    assert torch.equal(adapted, base_rows), f"{method} at step 0 must be bitwise the base"
    assert_close(adapted, base, torch.float32, "vs the unwrapped base")


def test_step0_svd_inits_are_the_principal_and_minor_parts_of_w():
    engine = le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=4, alpha=8, method="pissa"),
                                              le.AdapterSpec(rank=4, alpha=8, method="milora")], target_modules=FEW)
    name = "model.layers.0.mlp.down_proj"
    w = engine.bank.modules_info[name].weight
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    u32, s32, vh32 = torch.linalg.svd(w.float(), full_matrices=False)  # PyTorch's own fp32 SVD
    for i, part in ((0, slice(0, 4)), (1, slice(len(s) - 4, None))):
        t = engine.bank.tensors(i, name)
        assert not t["lora_A0"].requires_grad and t["lora_A"].requires_grad
        sba = engine.adapter_spec(i).scale_for(name) * t["lora_B"].double() @ t["lora_A"].double()
        # Near-degenerate singular values make the rank-4 part ill-conditioned: compare with fp64
        # against the error of PyTorch's own fp32 SVD, not the per-op TOL.
        own = u32[:, part] @ torch.diag(s32[part]) @ vh32[part]
        assert_as_close_as_torch(sba, own, u[:, part] @ torch.diag(s[part]) @ vh[part], torch.float32,
                                 f"adapter {i} s B A")


def test_lora_fa_never_changes_a():
    engine = le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=4, method="lora_fa", lr=1e-2, weight_decay=0.1)])
    named = engine.bank.named_parameters_of(0)
    a_names = [n for n in named if n.endswith("lora_A")]
    assert a_names and all(not named[n].requires_grad for n in a_names)
    assert all(p.requires_grad for p in engine.adapter_parameters(0))
    assert len(engine.adapter_parameters(0)) == len(named) // 2, "adapter_parameters holds the trainable B only"
    before = {n: p.detach().clone() for n, p in named.items()}
    # Both the groups of methods.param_groups and the trainer's current name-suffix groups
    # (frozen A inside the A group) must leave A alone: AdamW skips tensors without a gradient.
    trainer_groups = [{"params": [p for n, p in named.items() if n.endswith("lora_A")]},
                      {"params": [p for n, p in named.items() if n.endswith("lora_B")]}]
    for groups in (methods.param_groups(engine, 0), trainer_groups):
        opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1)
        for _ in range(2):
            opt.zero_grad()
            engine(_batch(2), adapter_ids=torch.tensor([0, 0])).logits.square().mean().backward()
            opt.step()
    for n, p in named.items():
        changed = not torch.equal(p, before[n])
        assert changed == n.endswith("lora_B"), f"{n}: changed={changed}"


def test_one_step_with_param_groups_moves_exactly_the_trainable_tensors():
    engine = _all_methods_engine()
    _perturb(engine)
    before = {i: {n: p.detach().clone() for n, p in engine.bank.named_parameters_of(i).items()}
              for i in engine.adapter_ids}
    opts = {i: torch.optim.AdamW(methods.param_groups(engine, i), weight_decay=0.01) for i in engine.adapter_ids}
    n = len(METHODS)
    out = engine(_batch(n), adapter_ids=torch.arange(n)).logits
    out.square().mean().backward()
    for opt in opts.values():
        opt.step()
    for i, m in enumerate(METHODS):
        for name, p in engine.bank.named_parameters_of(i).items():
            assert (not torch.equal(p, before[i][name])) == p.requires_grad, f"{m}: {name}"


def test_mixed_batch_of_every_method_keeps_isolation(backend):
    engine = _all_methods_engine()
    _perturb(engine)
    n = len(METHODS)
    ids = _batch(n + 2, L=5)
    mixed_ids = torch.tensor(list(range(n)) + [0, -1])
    _, mixed = _grads(engine, ids, mixed_ids)
    for a in range(n):
        alone_ids = torch.where(mixed_ids == a, mixed_ids, torch.full_like(mixed_ids, -1))
        _, alone = _grads(engine, ids, alone_ids)
        for j, (gm, ga) in enumerate(zip(mixed[a], alone[a])):
            assert_close(gm, ga, torch.float32, f"{METHODS[a]} grad {j}")


def test_delta_weight_reproduces_each_methods_layer_output():
    engine = _all_methods_engine()
    _perturb(engine)
    n_checked = {}
    # q_proj: no IA3; v_proj: IA3 scales the output; down_proj: IA3 scales the input.
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"):
        layer = engine.model.get_submodule(name)
        x = torch.randn(1, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
        for i, m in enumerate(METHODS):
            deltas = methods.delta_weights(engine, i)
            if name not in deltas:
                continue
            with torch.no_grad(), engine.use_adapters(torch.tensor([i])):
                y = layer(x)
            ref = torch.nn.functional.linear(x.double(), layer.weight.double() + deltas[name].double(),
                                             None if layer.bias is None else layer.bias.double())
            assert_close(y, ref.float(), torch.float32, f"{m}: x (W + dW)^T on {name}")
            n_checked[m] = n_checked.get(m, 0) + 1
    assert set(n_checked) == set(METHODS) - {"ln_tuning"} and n_checked["ia3"] == 2
    ln = METHODS.index("ln_tuning")
    norm = "model.layers.1.post_attention_layernorm"
    want = engine.bank.tensors(ln, norm)["ln_weight"] - engine.bank.modules_info[norm].weight
    assert torch.equal(methods.delta_weights(engine, ln)[norm], want), "LN tuning: w_a - w"


def test_dora_norm_memo_is_fresh_after_an_in_place_update():
    engine = le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=4, method="dora")])
    _perturb(engine)
    ids = _batch(1)
    b = engine.bank.named_parameters_of(0)["model.layers.0.self_attn.q_proj.lora_B"]
    with torch.no_grad(), engine.use_adapters(torch.tensor([0])):
        first = engine.model(ids).logits
        b.mul_(3.0)
        second = engine.model(ids).logits
    with torch.no_grad():
        fresh = engine(ids, adapter_ids=torch.tensor([0])).logits
    assert not torch.equal(first, second)
    assert torch.equal(second, fresh)


# --- parity with PEFT -----------------------------------------------------------------------

PEFT_SPECS = [
    pytest.param(dict(method="lora", rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 8},
                      alpha_pattern={"down_proj": 3.0}), id="lora-rank_pattern"),
    pytest.param(dict(method="rslora", target_modules="attention"), id="rslora-attention"),
    pytest.param(dict(method="dora", target_modules=("q_proj", "v_proj", "down_proj"), layers=(1,)), id="dora-layer1"),
    pytest.param(dict(method="dora", scaling="rslora"), id="dora-rslora"),
    pytest.param(dict(method="vera", target_modules=("q_proj", "up_proj", "down_proj")), id="vera"),
    pytest.param(dict(method="pissa", target_modules="mlp"), id="pissa-as-exported-lora"),
]


@pytest.mark.parametrize("kw", PEFT_SPECS)
def test_matches_peft_output_and_grads(kw):
    peft = pytest.importorskip("peft")
    spec = le.AdapterSpec(rank=4, alpha=8, seed=5, **kw)
    base = tiny_model()
    engine = le.MultiLoRAModel(copy.deepcopy(base), [spec])
    _perturb(engine)
    cfg = peft_format.peft_config_for(spec, engine.bank.modules_of(0))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.get_peft_config(cfg))
    sd = peft_format.peft_state_dict_for(engine, 0)
    if spec.method == "vera":
        own = peft.get_peft_model_state_dict(pm)
        for k in ("base_model.vera_A", "base_model.vera_B"):
            assert torch.equal(own[k], sd[k]), f"{k}: the shared projection PEFT draws itself"
    res = peft.set_peft_model_state_dict(pm, sd)
    assert not res.unexpected_keys
    assert set(peft.get_peft_model_state_dict(pm)) == set(sd), "our keys are PEFT's keys"
    pm64 = copy.deepcopy(pm).double()  # PEFT's model in fp64: the reference for both
    ids = _batch(2)
    w = torch.randn(2, 7, 97, generator=torch.Generator().manual_seed(9))
    ours, grads = _grads(engine, ids, torch.tensor([0, 0]), seed=9)
    theirs = pm(ids).logits
    (theirs * w).sum().backward()
    theirs64 = pm64(ids).logits
    (theirs64 * w.double()).sum().backward()
    # Whole model: ours may be at most ~2x as far from fp64 as PEFT's own fp32 model is.
    assert_as_close_as_torch(ours, theirs.detach(), theirs64.detach(), torch.float32, "logits vs PEFT")
    if spec.method == "pissa":
        return  # exported as a rank-2r LoRA: its gradients are not PiSSA's (see the PiSSA test)
    peft_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    peft_grads64 = {n: p.grad for n, p in pm64.named_parameters() if p.requires_grad}
    n_cmp = 0
    for name, p in engine.bank.named_parameters_of(0).items():
        module, kind = name.rsplit(".", 1)
        suffix = ".weight" if kind in ("lora_A", "lora_B", "lora_magnitude_vector") else ""
        key = f"base_model.model.{module}.{kind}.default{suffix}"
        assert_as_close_as_torch(p.grad, peft_grads[key], peft_grads64[key], torch.float32, name)
        n_cmp += 1
    assert n_cmp == len(peft_grads)


def test_pissa_matches_peft_residual_model_at_step0_and_after_a_perturbation():
    peft = pytest.importorskip("peft")
    spec = le.AdapterSpec(rank=4, alpha=8, method="pissa", target_modules=("q_proj", "v_proj", "up_proj"))
    base = tiny_model()
    engine = le.MultiLoRAModel(copy.deepcopy(base), [spec])
    names = engine.bank.modules_of(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=names, init_lora_weights="pissa", lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    lora_mods = {n.split("base_model.model.", 1)[1]: m for n, m in pm.named_modules()
                 if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert sorted(lora_mods) == names
    for n, m in lora_mods.items():
        t = engine.bank.tensors(0, n)
        assert_close(t["lora_A"], m.lora_A["default"].weight, torch.float32, f"{n} A init")
        assert_close(t["lora_B"], m.lora_B["default"].weight, torch.float32, f"{n} B init")
    ids = _batch(2)
    for step in ("init", "perturbed"):
        if step == "perturbed":
            _perturb(engine, seed=4)
        with torch.no_grad():
            for n, m in lora_mods.items():
                m.lora_A["default"].weight.copy_(engine.bank.tensors(0, n)["lora_A"])
                m.lora_B["default"].weight.copy_(engine.bank.tensors(0, n)["lora_B"])
        ours, grads = _grads(engine, ids, torch.tensor([0, 0]), seed=9)
        pm.zero_grad(set_to_none=True)
        pm64 = copy.deepcopy(pm).double()  # PEFT's residual model in fp64: the reference
        mods64 = {n: pm64.get_submodule(f"base_model.model.{n}") for n in lora_mods}
        w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(9))
        theirs = pm(ids).logits
        (theirs * w).sum().backward()
        theirs64 = pm64(ids).logits
        (theirs64 * w.double()).sum().backward()
        # Whole model: ours may be at most ~2x as far from fp64 as PEFT's own fp32 model is.
        assert_as_close_as_torch(ours, theirs.detach(), theirs64.detach(), torch.float32, f"logits ({step})")
        for n, m in lora_mods.items():
            t, m64 = engine.bank.tensors(0, n), mods64[n]
            for k, g in (("lora_A", t["lora_A"].grad), ("lora_B", t["lora_B"].grad)):
                assert_as_close_as_torch(g, getattr(m, k)["default"].weight.grad,
                                         getattr(m64, k)["default"].weight.grad, torch.float32, f"{n} d{k[-1]} ({step})")


def test_vera_projections_are_shared_and_init_as_peft():
    engine = le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=4, method="vera", seed=0),
                                              le.AdapterSpec(rank=4, method="vera", seed=1),
                                              le.AdapterSpec(rank=2, method="vera")])
    (a, b), (a2, _), (a3, _) = (engine.bank.vera_of(i) for i in range(3))
    assert a is a2 and a3.shape == (2, 96), "same rank and key share one projection; another rank gets its own"
    assert torch.equal(a.cpu(), methods.vera_projections(4, 0, 96, 96)[0]) and b.shape == (96, 4)
    t = engine.bank.tensors(0, "model.layers.0.mlp.down_proj")
    assert torch.equal(t["vera_lambda_d"], torch.full((4,), 0.1)) and torch.count_nonzero(t["vera_lambda_b"]) == 0


# --- specs: ranks per module, targets, errors -------------------------------------------------

def test_rank_pattern_alpha_pattern_and_target_selection():
    spec = le.AdapterSpec(rank=4, alpha=8, rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 16},
                          alpha_pattern={"down_proj": 32})
    e = le.MultiLoRAModel(tiny_model(), [
        spec,
        le.AdapterSpec(rank=2, target_modules="attention", layers=(1,)),
        le.AdapterSpec(rank=2, target_modules="mlp", method="dora"),
        le.AdapterSpec(rank=2, target_modules=("q_proj", "v_proj"), layers=(0,), method="pissa"),
    ])
    named = e.bank.named_parameters_of(0)
    assert named["model.layers.0.self_attn.q_proj.lora_A"].shape == (2, 64)
    assert named["model.layers.1.mlp.down_proj.lora_A"].shape == (16, 96)
    assert named["model.layers.0.mlp.down_proj.lora_B"].shape == (64, 4)
    assert named["model.layers.0.self_attn.k_proj.lora_B"].shape == (32, 4)
    lay = e.bank.layout("model.layers.1.mlp.down_proj")
    assert lay.ranks[0] == 16 and lay.scales[0] == pytest.approx(32 / 16)
    assert e.bank.layout("model.layers.0.self_attn.q_proj").scales[0] == pytest.approx(8 / 2)
    assert e.bank.modules_of(1) == [f"model.layers.1.self_attn.{p}_proj" for p in "koqv"]
    assert {n.rsplit(".", 1)[1] for n in e.bank.modules_of(2)} == {"gate_proj", "up_proj", "down_proj"}
    assert e.bank.modules_of(3) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert e.bank.layout("model.layers.0.self_attn.q_proj").ranks[3] == 4, "PiSSA: 2r rows in the kernel"
    assert e.bank.layout("model.layers.0.self_attn.q_proj").ranks[2] == 0


def test_lora_plus_and_rslora_defaults_and_param_groups():
    assert le.AdapterSpec(rank=2, method="lora_plus").lora_plus_ratio == 16.0
    assert le.AdapterSpec(rank=2, method="lora_plus", lora_plus_ratio=4.0).lora_plus_ratio == 4.0
    assert le.AdapterSpec(rank=2).lora_plus_ratio == 1.0
    assert le.AdapterSpec(rank=4, alpha=8, method="rslora").scale == pytest.approx(4.0)
    e = le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=2, method="lora_plus", lr=1e-3),
                                         le.AdapterSpec(rank=2, method="dora", lr=1e-3),
                                         le.AdapterSpec(rank=2, method="full", lr=1e-4)])
    slow, fast = methods.param_groups(e, 0)
    assert fast["lr"] == pytest.approx(16e-3) and slow["lr"] == 1e-3 and len(slow["params"]) == len(fast["params"])
    slow, fast = methods.param_groups(e, 1)
    assert len(fast["params"]) == 2 * len(slow["params"]), "DoRA: B and m at the LoRA+ rate, as PEFT's LoRA+"
    slow, fast = methods.param_groups(e, 2)
    assert len(slow["params"]) == 14 and not fast["params"], "full: one dW per module (2 layers x 7)"
    assert len({id(p) for g in methods.param_groups(e, 1) for p in g["params"]}) == len(e.adapter_parameters(1))


@pytest.mark.parametrize("make,match", [
    pytest.param(lambda: le.AdapterSpec(rank=2, method="nope"), "method must be one of", id="unknown-method"),
    pytest.param(lambda: le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=2, rank_pattern={"nope": 4})]),
                 "match none", id="rank_pattern-matches-nothing"),
    pytest.param(lambda: le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=2, target_modules=("q_proj",),
                                                                          alpha_pattern={"down_proj": 4})]),
                 "match none", id="alpha_pattern-outside-targets"),
    pytest.param(lambda: le.AdapterSpec(rank=2, method="vera", rank_pattern={"q_proj": 4}), "does not apply",
                 id="vera-rank_pattern"),
    pytest.param(lambda: le.AdapterSpec(rank=2, rank_pattern={"q_proj": 0}), "ranks must be", id="pattern-rank-0"),
    pytest.param(lambda: le.AdapterSpec(rank=2, rank_pattern={"q_proj(": 2}), "valid regex", id="pattern-bad-regex"),
    pytest.param(lambda: le.AdapterSpec(rank=2, layers=(-1,)), "layer indices", id="bad-layers"),
    pytest.param(lambda: le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=2, layers=(7,))]), "match no wrapped",
                 id="layers-match-nothing"),
    pytest.param(lambda: le.MultiLoRAModel(tiny_model(), [le.AdapterSpec(rank=20, method="pissa")]), "/ 2",
                 id="pissa-rank-over-half"),
    pytest.param(lambda: peft_format.peft_config_for(le.AdapterSpec(rank=2, method="full")), "no PEFT", id="full-export"),
    pytest.param(lambda: peft_format.peft_config_for(le.AdapterSpec(rank=2, target_modules="mlp")), "module_names",
                 id="group-export-needs-names"),
])
def test_bad_input_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- checkpoints ---------------------------------------------------------------------------------

def test_checkpoint_and_peft_round_trips_for_every_method(tmp_path):
    from safetensors.torch import load_file

    from lora_engine.engine import peft_format

    src = _all_methods_engine()
    _perturb(src)
    dst = _all_methods_engine()
    for i, m in enumerate(METHODS):
        expected = {n: p.detach().clone() for n, p in src.bank.named_parameters_of(i).items()}
        # The trainer's checkpoint path: peft_io writes every named tensor, frozen ones included.
        peft_format.save_adapter(src, i, tmp_path / f"a{i}")
        peft_format.load_adapter_state(dst, i, load_file(str(tmp_path / f"a{i}" / "adapter_model.safetensors")))
        for n, p in dst.bank.named_parameters_of(i).items():
            assert torch.equal(p, expected[n]), f"{m}: {n} after the checkpoint round trip"
        if m == "full":
            continue
        with torch.no_grad():
            for p in dst.bank.named_parameters_of(i).values():
                p.zero_()
        peft_format.load_adapter_state(dst, i, peft_format.peft_state_dict_for(src, i))
        for n, p in dst.bank.named_parameters_of(i).items():
            assert torch.equal(p, expected[n]), f"{m}: {n} after the PEFT-format round trip"
