"""The routed row scale (IA3's vectors, LayerNorm tuning's weights): the reference against an
independent per-row formula, the Triton kernel's output and every gradient against the
reference (fp32/fp16, odd sizes, empty segments, base-only rows, unscaled slots, split token
chunks), and the custom op's registration."""
import pytest
import torch
from torch.library import opcheck

from helpers import assert_close
from lora_engine.engine.routing import routing_from_token_ids
from lora_engine.kernels.rowscale import routed_scale_naive, routed_scale_triton
from lora_engine.kernels.rowscale import triton_rowscale

CASES = [
    # (T, N, slot_row, pattern, shift, base)
    pytest.param(63, 97, (0, -1, 1), "random", False, False, id="T63-N97-ia3"),
    pytest.param(40, 130, (1, 0, -1), "empty-segment", True, True, id="ln-empty-segment"),
    pytest.param(33, 50, (0,), "all-base", True, True, id="all-base-only"),
    pytest.param(17, 24, (-1, 0), "random", True, False, id="shift-no-base"),
    pytest.param(31, 36, (-1, -1), "random", False, True, id="nothing-scaled"),
    pytest.param(1, 5, (0,), "one-row", True, True, id="one-row"),
]


def _inputs(T, N, slot_row, pattern, shift, base, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A, n = len(slot_row), max(max(slot_row) + 1, 1)
    x = torch.randn(T, N, generator=g).to(dtype)
    scale = 1 + 0.3 * torch.randn(n, N, generator=g)
    sh = 0.5 * torch.randn(n, N, generator=g) if shift else None
    b = torch.randn(T, N, generator=g).to(dtype) if base else None
    ids = torch.randint(-1, A, (T,), generator=g)
    if pattern == "empty-segment":
        ids[ids == 1] = 0
    elif pattern == "all-base":
        ids[:] = -1
    elif pattern == "one-row":
        ids[:] = 0
    return x, scale, torch.tensor(slot_row), sh, b, routing_from_token_ids(ids, A), ids


def _run(fn, x, scale, slot_row, shift, base, routing, grad_out):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, scale, shift, base)]
    out = fn(leaves[0], leaves[1], slot_row, routing, shift=leaves[2], base=leaves[3])
    (out.float() * grad_out).sum().backward()
    # A leaf the op never read (x when every row keeps base) has no gradient: zero.
    return [out] + [None if t is None else (t.grad if t.grad is not None else torch.zeros_like(t)) for t in leaves]


@pytest.mark.parametrize("T,N,slot_row,pattern,shift,base", CASES)
def test_reference_is_the_per_row_formula(T, N, slot_row, pattern, shift, base):
    x, scale, rows, sh, b, routing, ids = _inputs(T, N, slot_row, pattern, shift, base, torch.float64)
    out = routed_scale_naive(x, scale, rows, routing, shift=sh, base=b)
    for t in range(T):
        a = int(ids[t])
        r = slot_row[a] if a >= 0 else -1
        want = (x[t] * scale[r] + (sh[r] if sh is not None else 0)) if r >= 0 else (b[t] if b is not None else x[t])
        assert torch.equal(out[t], want.to(out.dtype)), f"row {t} (adapter {a})"


@pytest.mark.parametrize("split", [pytest.param(False, id="one-chunk"), pytest.param(True, id="chunks-of-3")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T,N,slot_row,pattern,shift,base", CASES)
def test_triton_matches_reference(T, N, slot_row, pattern, shift, base, dtype, split, monkeypatch):
    if split:
        monkeypatch.setattr(triton_rowscale, "token_chunk_rows", lambda rank, block_t: 3)
    x, scale, rows, sh, b, routing, _ = _inputs(T, N, slot_row, pattern, shift, base, dtype)
    grad_out = torch.randn(T, N, generator=torch.Generator().manual_seed(1))
    ref = _run(routed_scale_naive, *[None if t is None else t.double() for t in (x, scale)], rows,
               *[None if t is None else t.double() for t in (sh, b)], routing, grad_out.double())
    got = _run(routed_scale_triton, x, scale, rows, sh, b, routing, grad_out.to(dtype))
    for name, g, r in zip(["out", "dx", "dscale", "dshift", "dbase"], got, ref):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == (scale.dtype if name in ("dscale", "dshift") else dtype), name
        if r.abs().sum() == 0:
            # Unscaled or absent adapters' rows, and rows the op never reads: exactly zero.
            assert torch.count_nonzero(g) == 0, f"{name} must be exactly zero"
            continue
        assert torch.equal(g == 0, r == 0) or name in ("out", "dx", "dbase"), f"{name} zero pattern"
        assert_close(g, r.to(g.dtype), dtype if name not in ("dscale", "dshift") else torch.float32
                     if dtype == torch.float32 else dtype, name)


def test_unscaled_rows_are_bitwise_untouched_and_scale_one_is_identity():
    x, scale, rows, _, _, routing, _ = _inputs(63, 97, (0, -1, 1), "random", False, False, torch.float32)
    for fn in (routed_scale_naive, routed_scale_triton):
        assert torch.equal(fn(x, torch.ones_like(scale), rows, routing), x)


@pytest.mark.parametrize("bad,match", [
    pytest.param(dict(x=torch.zeros(4, 3, 2)), "2-D", id="x-3d"),
    pytest.param(dict(scale=torch.zeros(2, 5)), "scale must be", id="scale-width"),
    pytest.param(dict(shift=torch.zeros(1, 4)), "shift must be", id="shift-shape"),
    pytest.param(dict(base=torch.zeros(4, 4, dtype=torch.float64)), "base dtype", id="base-dtype"),
    pytest.param(dict(slot_row=torch.zeros(1)), "slot_row must be", id="slot-row-float"),
    pytest.param(dict(slot_row=torch.zeros(1, dtype=torch.long)), "slots", id="slot-row-too-short"),
])
@pytest.mark.parametrize("fn", [routed_scale_naive, routed_scale_triton], ids=["naive", "triton"])
def test_bad_input(fn, bad, match):
    args = dict(x=torch.zeros(4, 4), scale=torch.ones(2, 4), slot_row=torch.tensor([0, 1]),
                routing=routing_from_token_ids(torch.tensor([0, 1, 1, -1]), 2), shift=None, base=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fn(args.pop("x"), args.pop("scale"), args.pop("slot_row"), args.pop("routing"), **args)


@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "chunks-of-3"])
def test_opcheck_routed_scale(monkeypatch, split):
    if split:
        monkeypatch.setattr(triton_rowscale, "token_chunk_rows", lambda rank, block_t: 3)
    x, scale, rows, sh, b, routing, _ = _inputs(40, 20, (1, 0, -1), "random", True, True, torch.float32)
    plan, part_rows = triton_rowscale._plan(routing)
    assert (part_rows > 0) == split
    x, scale, sh, b = (t.detach().clone().requires_grad_() for t in (x, scale, sh, b))
    opcheck(torch.ops.lora_engine.routed_scale.default, (x, scale, rows, sh, b, plan, part_rows, True))
    opcheck(torch.ops.lora_engine.routed_scale.default, (x, scale, rows, None, None, plan, part_rows, True))
