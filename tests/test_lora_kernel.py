"""Multi-adapter LoRA kernel: Triton path vs the fp32 reference, output and every gradient.

On a CPU the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1), which
cannot do tl.dot on bf16: fp32/fp16 here, bf16 in the `gpu` tests.
"""
import pytest
import torch

from helpers import TOL, assert_close, rel_rms
from lora_engine.kernels.lora import LoRALayout, Routing, lora_linear_naive, lora_linear_triton, token_chunk_rows
from lora_engine.kernels.lora import triton_lora
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


# --- weight gradients split over token chunks ---------------------------------------------------

@pytest.mark.parametrize("rank,rows", [
    pytest.param(1, 1024, id="rank1"), pytest.param(16, 1024, id="rank16"),
    pytest.param(129, 1088, id="rank129-rounds-up-to-BLOCK_T"), pytest.param(256, 2048, id="rank256"),
    pytest.param(512, 4096, id="rank512"),
])
def test_token_chunk_rows_rule(rank, rows):
    assert token_chunk_rows(rank, 64) == rows


@pytest.mark.parametrize("rank", [16, 64, 256])
def test_one_adapter_at_qwen3_8b_shapes_fills_132_sms(rank):
    """T=16384 tokens of one adapter, K=4096: at least 4 wgrad programs per SM of an H100/H200
    (before the split: 64 to 256 programs, each looping over all 16k rows)."""
    T, K = 16384, 4096
    layout = LoRALayout((rank,), (1.0,))
    routing = routing_from_token_ids(torch.zeros(T, dtype=torch.long), 1)
    ch = triton_lora._chunks(layout, routing)
    block_r = triton_lora._block_r(rank)
    programs = ch.chunk_seg.numel() * -(-rank // block_r) * (K // triton_lora.BLOCK_K)
    assert programs >= 4 * 132
    assert ch.part_rows * K * 4 <= T * K * 2 / 4  # fp32 partials <= 1/4 of the bf16 input


def test_token_chunks_table():
    """Segments of 5, 0 (empty) and 2 rows in chunks of 2: split segments own packed partial rows."""
    routing = Routing(num_tokens=7, token_idx=torch.arange(7), seg_start=(0, 5, 5, 7), seg_adapter=(0, 1, 2))
    ch = routing.token_chunks((2, 2, 2), (3, 1, 4))
    assert ch.chunk_seg.tolist() == [0, 0, 0, 2]
    assert ch.chunk_start.tolist() == [0, 2, 4, 5] and ch.chunk_end.tolist() == [2, 4, 5, 7]
    assert ch.chunk_prow.tolist() == [0, 3, 6, -1]  # rank-3 chunks at rows 0, 3, 6; the 1-chunk segment direct
    assert ch.red_seg.tolist() == [0] and ch.red_prow.tolist() == [0] and ch.red_n.tolist() == [3]
    assert ch.part_rows == 9


def _check_against_reference(inputs, dtype, seed=1):
    T, N = inputs[0].shape[0], inputs[1].shape[0]
    grad_out = torch.randn(T, N, generator=torch.Generator().manual_seed(seed))
    ref_inputs = [t.double() if torch.is_tensor(t) else t for t in inputs]
    ref = _run(lora_linear_naive, *ref_inputs, grad_out.double())
    got = _run(lora_linear_triton, *inputs, grad_out.to(dtype))
    for name, g, r in zip(["y", "dx", "dA", "dB"], got, ref):
        assert_close(g, r.to(g.dtype), dtype, name)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [pytest.param(3, id="chunks-of-3"), pytest.param(5, id="chunks-of-5")])
@pytest.mark.parametrize("T,K,N,ranks,pattern", [c for c in CASES if c.values[4] != "all-base"])
def test_forced_token_chunks_match_reference(monkeypatch, T, K, N, ranks, pattern, rows, dtype):
    """Tiny chunks (not multiples of BLOCK_T=64) so that every test shape splits its segments; the
    long-segment test below has chunks of 1024 rows, the GPU rule."""
    monkeypatch.setattr(triton_lora, "token_chunk_rows", lambda rank, block_t: rows)
    inputs = _make(T, K, N, ranks, pattern, dtype, "cpu")
    assert triton_lora._chunks(inputs[5], inputs[6]).red_seg.numel() > 0, "no segment was split"
    _check_against_reference(inputs, dtype)


def _long_adapter_inputs(dtype, with_other=True):
    """Adapter 0 with 2,100 tokens (chunks of 1024, 1024, 52 under the GPU rule), adapter 1 absent,
    adapter 2 with 70 tokens (one chunk), 30 base-only rows; rank 1 for adapter 0."""
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.zeros(2100, dtype=torch.long), torch.full((70,), 2), torch.full((30,), -1)])
    if not with_other:
        ids = ids[:2100]
    T, K, N, ranks = ids.numel(), 24, 20, (1, 3, 16)
    x = torch.randn(2200, K, generator=g)[:T]
    w = torch.randn(N, K, generator=g) / K ** 0.5
    bias = torch.randn(N, generator=g)
    la = torch.randn(sum(ranks), K, generator=g) / K ** 0.5
    lb = torch.randn(N, sum(ranks), generator=g)
    layout = LoRALayout(ranks, [2.0 / r ** 0.5 for r in ranks])
    cast = lambda t: t.to(dtype)
    return cast(x), cast(w), cast(bias), cast(la), cast(lb), layout, routing_from_token_ids(ids, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_long_segment_under_the_gpu_rule_matches_reference(dtype):
    inputs = _long_adapter_inputs(dtype)
    assert triton_lora._chunks(inputs[5], inputs[6]).red_n.tolist() == [3]
    _check_against_reference(inputs, dtype)


def test_chunked_gradients_deterministic_and_isolated():
    """Same bits run to run; adapter 0's dA, dB the same bits with or without adapter 2's tokens
    in the batch (chunk sizes depend on an adapter's own rank and tokens only)."""
    both = _long_adapter_inputs(torch.float32)
    alone = _long_adapter_inputs(torch.float32, with_other=False)
    g = torch.randn(2200, 20, generator=torch.Generator().manual_seed(4))
    a = _run(lora_linear_triton, *both, g[:2200])
    b = _run(lora_linear_triton, *both, g[:2200])
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    c = _run(lora_linear_triton, *alone, g[:2100])
    assert torch.equal(a[2][:1], c[2][:1]) and torch.equal(a[3][:, :1], c[3][:, :1])
    assert torch.count_nonzero(c[2][1:]) == 0  # adapters without tokens: exactly zero


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("T,K,N,ranks,pattern", CASES + [
    pytest.param(4096, 1024, 3072, (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), "random", id="large-mixed"),
    pytest.param(3000, 256, 192, (16,), "single", id="one-adapter-3-token-chunks"),
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
