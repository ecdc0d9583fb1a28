"""Multi-adapter LoRA kernel: Triton path vs the fp32 reference, output and every gradient.

On a CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1), which
cannot do tl.dot on bf16: fp32/fp16 here, bf16 in the `gpu` tests.
"""
import pytest
import torch

from helpers import TOL, assert_close, rel_rms
from lora_engine.kernels.lora import LoRALayout, lora_linear_naive, lora_linear_triton
from lora_engine.engine.routing import build_routing, routing_from_token_ids

CASES = [
    # (T, K, N, ranks, per-token adapter pattern)
    pytest.param(63, 123, 97, (1, 3, 16, 64), "random", id="T63-K123-mixed-ranks"),
    pytest.param(40, 260, 272, (1, 256), "random", id="rank256"),
    pytest.param(63, 123, 97, (3, 16, 5), "empty-segment", id="empty-segment"),
    pytest.param(33, 50, 70, (1, 16), "all-base", id="all-base-only"),
    pytest.param(17, 40, 24, (1,), "single", id="rank1-single-adapter"),
    pytest.param(31, 48, 36, (4, 0, 8), "random", id="rank0-module-skipped"),
]


def _make(T, K, N, ranks, pattern, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = len(ranks)
    x = torch.randn(T, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    bias = torch.randn(N, generator=g)
    R = sum(ranks)
    la = torch.randn(R, K, generator=g) / K ** 0.5
    lb = torch.randn(N, R, generator=g)
    if pattern == "random":
        ids = torch.randint(-1, A, (T,), generator=g)
    elif pattern == "empty-segment":
        ids = torch.randint(-1, A, (T,), generator=g)
        ids[ids == 1] = 0  # adapter 1 has no tokens
    elif pattern == "all-base":
        ids = torch.full((T,), -1)
    else:
        ids = torch.zeros(T, dtype=torch.long)
    scales = [2.0 / max(r, 1) ** 0.5 for r in ranks]
    layout = LoRALayout(ranks, scales)
    routing = routing_from_token_ids(ids, A, device)
    cast = lambda t: t.to(device=device, dtype=dtype)
    return cast(x), cast(w), cast(bias), cast(la), cast(lb), layout, routing


def _run(fn, x, w, bias, la, lb, layout, routing, grad_out):
    x = x.detach().clone().requires_grad_()
    la = la.detach().clone().requires_grad_()
    lb = lb.detach().clone().requires_grad_()
    y = fn(x, w, bias, la, lb, layout, routing)
    (y.float() * grad_out).sum().backward()
    return y, x.grad, la.grad, lb.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,K,N,ranks,pattern", CASES)
def test_triton_matches_reference(T, K, N, ranks, pattern, dtype):
    inputs = _make(T, K, N, ranks, pattern, dtype, "cpu")
    grad_out = torch.randn(T, N, generator=torch.Generator().manual_seed(1))
    ref_inputs = [t.double() if torch.is_tensor(t) else t for t in inputs]
    ref = _run(lora_linear_naive, *ref_inputs, grad_out.double())
    got = _run(lora_linear_triton, *inputs, grad_out.to(dtype))
    # PyTorch itself in this dtype, to calibrate: the kernel may be at most ~2x as wrong.
    torch_own = _run(lora_linear_naive, *inputs, grad_out.to(dtype)) if dtype == torch.float32 else None
    for name, g, r in zip(["y", "dx", "dA", "dB"], got, ref):
        if name in ("dA", "dB") and pattern == "all-base":
            assert torch.count_nonzero(g) == 0, f"{name} must be exactly zero when no token uses an adapter"
            continue
        assert_close(g, r.to(g.dtype), dtype, name)
    if torch_own is not None:
        for name, g, o, r in zip(["y", "dx", "dA", "dB"], got, torch_own, ref):
            if pattern != "all-base":
                assert rel_rms(g, r) <= 2 * rel_rms(o, r) + TOL[dtype] / 2, name


def test_empty_segment_and_absent_adapter_get_zero_grads():
    x, w, bias, la, lb, layout, routing = _make(63, 123, 97, (3, 16, 5), "empty-segment", torch.float32, "cpu")
    _, _, dA, dB = _run(lora_linear_triton, x, w, bias, la, lb, layout, routing, torch.randn(63, 97))
    off, r = layout.offsets[1], layout.ranks[1]
    assert torch.count_nonzero(dA[off:off + r]) == 0
    assert torch.count_nonzero(dB[:, off:off + r]) == 0
    assert torch.count_nonzero(dA[:3]) > 0


def test_deterministic():
    inputs = _make(63, 123, 97, (1, 3, 16, 64), "random", torch.float32, "cpu")
    grad_out = torch.randn(63, 97)
    a = _run(lora_linear_triton, *inputs, grad_out)
    b = _run(lora_linear_triton, *inputs, grad_out)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)


def test_sequence_routing_matches_per_token_routing():
    ids = torch.tensor([0, 1, -1, 0])
    r_seq = build_routing(ids, seq_len=5, num_adapters=2)
    r_tok = routing_from_token_ids(ids.repeat_interleave(5), 2)
    assert torch.equal(r_seq.token_idx, r_tok.token_idx)
    assert r_seq.seg_start == (0, 10, 15) and r_seq.seg_adapter == (0, 1)


@pytest.mark.parametrize("fn", [lora_linear_naive, lora_linear_triton], ids=["naive", "triton"])
@pytest.mark.parametrize("case,match", [
    pytest.param("rank>min", "exceed min", id="rank-too-large"),
    pytest.param("ids", "adapter ids must lie", id="adapter-id-out-of-range"),
    pytest.param("shape-a", "lora_a must be", id="lora_a-shape"),
    pytest.param("shape-w", "weight must be", id="weight-shape"),
    pytest.param("dtype", "dtype", id="dtype-mismatch"),
    pytest.param("tokens", "routing covers", id="routing-T-mismatch"),
])
def test_bad_input_raises_value_error(fn, case, match):
    x, w, bias, la, lb, layout, routing = _make(16, 20, 12, (2, 4), "random", torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        if case == "rank>min":
            big = LoRALayout((2, 13), (1.0, 1.0))
            fn(x, w, bias, torch.zeros(15, 20), torch.zeros(12, 15), big, routing)
        elif case == "ids":
            build_routing(torch.tensor([0, 2]), 8, num_adapters=2)
        elif case == "shape-a":
            fn(x, w, bias, la[:-1], lb, layout, routing)
        elif case == "shape-w":
            fn(x, w[:, :-1], bias, la, lb, layout, routing)
        elif case == "dtype":
            fn(x, w, bias, la.half(), lb, layout, routing)
        elif case == "tokens":
            fn(x[:-1], w, bias, la, lb, layout, routing)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("T,K,N,ranks,pattern", CASES + [
    pytest.param(4096, 1024, 3072, (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), "random", id="large-mixed"),
])
def test_triton_compiled_gpu(T, K, N, ranks, pattern, dtype):
    inputs = _make(T, K, N, ranks, pattern, dtype, "cuda")
    grad_out = torch.randn(T, N, device="cuda")
    ref_inputs = [t.double() if torch.is_tensor(t) else t for t in inputs]
    ref = _run(lora_linear_naive, *ref_inputs, grad_out.double())
    got = _run(lora_linear_triton, *inputs, grad_out.to(dtype))
    for name, g, r in zip(["y", "dx", "dA", "dB"], got, ref):
        if pattern == "all-base" and name in ("dA", "dB"):
            assert torch.count_nonzero(g) == 0
            continue
        assert_close(g, r.to(g.dtype), dtype, name)
