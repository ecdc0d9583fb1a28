"""DoRA column-scale epilogue with its dg reduction split over token chunks: Triton path (the CPU
interpreter, the launchers' GPU tiles BLOCK_T = BLOCK_N = 64) vs the fp64 reference, output and
every gradient. The unsplit cases live in test_methods.py."""
import pytest
import torch

from helpers import assert_close
from lora_engine.kernels.lora import lora_column_scale_naive, lora_column_scale_triton, triton_dora
from lora_engine.engine.routing import routing_from_token_ids

CASES = [
    # (adapter id per row, flags, bias)
    pytest.param(torch.randint(-1, 3, (63,), generator=torch.Generator().manual_seed(0)), (True, False, True),
                 True, id="T63-mixed-flags"),
    pytest.param(torch.tensor([0] * 20 + [2] * 13 + [-1] * 7), (True, True, True), True, id="empty-segment"),
    pytest.param(torch.zeros(17, dtype=torch.long), (True,), False, id="one-adapter-no-bias"),
]


def _inputs(ids, flags, bias, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, A = ids.numel(), len(flags)
    y = torch.randn(T, N, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    scale = 1 + 0.2 * torch.randn(A, N, generator=g)
    return y, b, scale, flags, routing_from_token_ids(ids, A)


def _run(fn, y, b, scale, flags, routing, grad_out):
    y = y.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    out = fn(y, b, scale, flags, routing)
    (out.float() * grad_out).sum().backward()
    return out, y.grad, None if b is None else b.grad, scale.grad


def _check(inputs, dtype):
    T, N = inputs[0].shape
    grad_out = torch.randn(T, N, generator=torch.Generator().manual_seed(1))
    ref_in = [t.double() if torch.is_tensor(t) else t for t in inputs]
    ref = _run(lora_column_scale_naive, *ref_in, grad_out.double())
    got = _run(lora_column_scale_triton, *inputs, grad_out.to(dtype))
    for name, g, r in zip(["out", "dy", "dbias", "dscale"], got, ref):
        if r is None:
            continue
        if name == "dscale":
            assert torch.equal(g == 0, r == 0), "dscale: rows of unflagged or absent adapters exactly zero"
        assert_close(g, r.to(g.dtype), dtype, name)
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows", [pytest.param(3, id="chunks-of-3"), pytest.param(5, id="chunks-of-5")])
@pytest.mark.parametrize("ids,flags,bias", CASES)
def test_forced_token_chunks_match_reference(monkeypatch, ids, flags, bias, rows, dtype):
    monkeypatch.setattr(triton_dora, "token_chunk_rows", lambda rank, block_t: rows)
    inputs = _inputs(ids, flags, bias, 70, dtype)
    S = inputs[4].num_segments
    assert inputs[4].token_chunks((rows,) * S, (1,) * S).red_seg.numel() > 0, "no segment was split"
    _check(inputs, dtype)


def _long_ids(with_other=True):
    """Adapter 0 with 2,100 rows (chunks of 1024, 1024, 52 under the GPU rule), adapter 1 absent,
    adapter 2 with 70 rows (one chunk), 30 base-only rows."""
    ids = torch.cat([torch.zeros(2100, dtype=torch.long), torch.full((70,), 2), torch.full((30,), -1)])
    return ids if with_other else ids[:2100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_long_segment_under_the_gpu_rule_matches_reference(dtype):
    inputs = _inputs(_long_ids(), (True, True, True), True, 20, dtype)
    rows = triton_dora.token_chunk_rows(1, triton_dora.BLOCK_T)
    assert rows == 1024
    assert inputs[4].token_chunks((rows,) * 2, (1,) * 2).red_n.tolist() == [3]
    _check(inputs, dtype)


def test_chunked_dscale_deterministic_and_isolated():
    """Same bits run to run; adapter 0's dscale the same bits with or without adapter 2's rows."""
    y, b, scale, flags, routing = _inputs(_long_ids(), (True, True, True), True, 20, torch.float32)
    grad_out = torch.randn(2200, 20, generator=torch.Generator().manual_seed(2))
    first = _run(lora_column_scale_triton, y, b, scale, flags, routing, grad_out)
    again = _run(lora_column_scale_triton, y, b, scale, flags, routing, grad_out)
    for a, c in zip(first, again):
        assert torch.equal(a, c)
    alone = _run(lora_column_scale_triton, y[:2100], b, scale, flags, routing_from_token_ids(_long_ids(False), 3),
                 grad_out[:2100])
    assert torch.equal(first[3][0], alone[3][0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_long_segment_compiled_gpu(dtype):
    y, b, scale, flags, routing = _inputs(_long_ids(), (True, True, True), True, 200, dtype)
    routing = routing_from_token_ids(_long_ids(), 3, "cuda")
    inputs = (y.cuda(), b.cuda(), scale.cuda(), flags, routing)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).cuda()
    ref_in = [t.double() if torch.is_tensor(t) else t for t in inputs]
    ref = _run(lora_column_scale_naive, *ref_in, grad_out.double())
    got = _run(lora_column_scale_triton, *inputs, grad_out.to(dtype))
    for name, g, r in zip(["out", "dy", "dbias", "dscale"], got, ref):
        assert_close(g, r.to(g.dtype), dtype, name)
