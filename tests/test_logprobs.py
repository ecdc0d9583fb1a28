"""Fused log-probs (+ entropy): Triton path vs the fp64 reference, TRL parity, edge cases.

On a CPU the Triton kernels run in the interpreter with tiny tiles (BLOCK_T=16, BLOCK_V=32,
BLOCK_D=16, 64-column V splits, 32-row backward chunks), so the shapes below cross several
T blocks, V blocks, V splits and backward chunks. fp32/fp16 here; bf16 in the `gpu` tests.
"""
import pytest
import torch
import triton
import triton.language as tl

import lora_engine as le
from helpers import assert_close
from lora_engine.kernels.logprobs import token_logprobs_naive, token_logprobs_triton
from lora_engine.kernels.logprobs import triton_logprobs as tlp

CASES = [
    # (T, d, V, temperature)
    pytest.param(63, 48, 200, 1.0, id="T63-d48-V200"),
    pytest.param(40, 33, 97, 0.7, id="odd-d33-V97-temp0.7"),
    pytest.param(17, 64, 64, 1.3, id="V-multiple-of-block-temp1.3"),
    pytest.param(1, 16, 33, 1.0, id="T1-V33"),
]


def _make(T, d, V, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, d, generator=g) * scale).to(dtype)
    w = (torch.randn(V, d, generator=g) / d ** 0.5).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    return h, w, y


def _run(fn, h, w, y, temperature, with_entropy, g_logp, g_ent, dtype=None):
    """Outputs and dh of sum(g_logp * logp) [+ sum(g_ent * entropy)]."""
    x = (h if dtype is None else h.to(dtype)).detach().requires_grad_()
    ww = w if dtype is None else w.to(dtype)
    out = fn(x, ww, y, temperature=temperature, return_entropy=with_entropy)
    if with_entropy:
        logp, ent = out
        ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
        return logp, ent, x.grad
    (out * g_logp).sum().backward()
    return out, None, x.grad


@pytest.mark.parametrize("T,d,V,temperature", CASES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("with_entropy", [pytest.param(False, id="logp"),
                                          pytest.param(True, id="logp+entropy")])
def test_triton_matches_reference(T, d, V, temperature, dtype, with_entropy):
    h, w, y = _make(T, d, V, dtype)
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    logp, ent, dh = _run(token_logprobs_triton, h, w, y, temperature, with_entropy, g_logp, g_ent)
    ref_logp, ref_ent, ref_dh = _run(token_logprobs_naive, h, w, y, temperature, with_entropy,
                                     g_logp.double(), g_ent.double(), dtype=torch.float64)
    assert logp.dtype == torch.float32 and dh.dtype == dtype
    assert_close(logp, ref_logp, dtype, "logp")
    if with_entropy:
        assert ent.dtype == torch.float32
        assert_close(ent, ref_ent, dtype, "entropy")
    assert_close(dh, ref_dh, dtype, "dh")


@pytest.mark.parametrize("T,d,V,temperature", CASES[:2])
def test_matches_trl(T, d, V, temperature):
    """Naive (fp64) and Triton (fp32) vs TRL's selective_log_softmax / entropy_from_logits."""
    utils = pytest.importorskip("trl.trainer.utils")
    h, w, y = _make(T, d, V, torch.float32)
    g = torch.Generator().manual_seed(2)
    g_logp, g_ent = torch.randn(T, generator=g).double(), torch.randn(T, generator=g).double()

    x = h.double().requires_grad_()
    logits = x @ w.double().t()
    trl_logp = utils.selective_log_softmax(logits, y, temperature=temperature)
    trl_ent = utils.entropy_from_logits(logits / temperature)
    ((trl_logp * g_logp).sum() + (trl_ent * g_ent).sum()).backward()

    n_logp, n_ent, n_dh = _run(token_logprobs_naive, h, w, y, temperature, True, g_logp, g_ent,
                               dtype=torch.float64)
    assert_close(n_logp, trl_logp, torch.float64, "naive logp vs TRL")
    assert_close(n_ent, trl_ent, torch.float64, "naive entropy vs TRL")
    assert_close(n_dh, x.grad, torch.float64, "naive dh vs TRL")

    t_logp, t_ent, t_dh = _run(token_logprobs_triton, h, w, y, temperature, True,
                               g_logp.float(), g_ent.float())
    assert_close(t_logp, trl_logp, torch.float32, "triton logp vs TRL")
    assert_close(t_ent, trl_ent, torch.float32, "triton entropy vs TRL")
    assert_close(t_dh, x.grad, torch.float32, "triton dh vs TRL")


def _offset_logits_inputs(T, d, V, offset):
    """Logits offset + O(1) spread, exactly representable in fp32: entries are multiples of
    1/32, so every product is a multiple of 2^-10 and every partial sum below 2^14 is exact;
    the only error left is the kernel's own (an lse-based fp32 kernel fails here)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randint(-32, 33, (T, d), generator=g).float() / 32
    w = torch.randint(-8, 9, (V, d), generator=g).float() / 32
    h[:, 0] = offset
    w[:, 0] = 1.0
    return h, w, torch.randint(0, V, (T,), generator=g)


LARGE = [
    pytest.param("spread", id="logits-spread-1e4"),
    pytest.param("offset", id="logits-offset-1e4"),
]


@pytest.mark.parametrize("kind", LARGE)
def test_large_logits_finite_and_accurate(kind):
    T, d, V = 33, 24, 100
    if kind == "spread":
        h, w, y = _make(T, d, V, torch.float32, seed=4, scale=1e4)  # |z| ~ 1e4, near one-hot
    else:
        h, w, y = _offset_logits_inputs(T, d, V, offset=1e4)        # z ~ 1e4 +- 5
    g = torch.Generator().manual_seed(5)
    g_logp, g_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    logp, ent, dh = _run(token_logprobs_triton, h, w, y, 1.0, True, g_logp, g_ent)
    ref_logp, ref_ent, ref_dh = _run(token_logprobs_naive, h, w, y, 1.0, True,
                                     g_logp.double(), g_ent.double(), dtype=torch.float64)
    for name, t in (("logp", logp), ("entropy", ent), ("dh", dh)):
        assert torch.isfinite(t).all(), f"{name} has nan/inf"
    assert (ent >= -1e-6).all()
    assert_close(logp, ref_logp, torch.float32, "logp")
    assert_close(ent, ref_ent, torch.float32, "entropy")
    assert_close(dh, ref_dh, torch.float32, "dh")


def test_leading_dims_strides_and_entropy_only_grad():
    """[B, L, d] input with a non-contiguous slice; gradient through the entropy alone."""
    B, L, d, V = 3, 11, 20, 70
    h, w, _ = _make(B * (L + 1), d, V, torch.float32, seed=6)
    h = h.view(B, L + 1, d)[:, :-1]  # the usual "drop the last position" slice
    y = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(7))
    g_ent = torch.randn(B, L, generator=torch.Generator().manual_seed(8))
    outs = []
    for fn, dt in ((token_logprobs_triton, torch.float32), (token_logprobs_naive, torch.float64)):
        x = h.to(dt).detach().requires_grad_()
        logp, ent = fn(x, w.to(dt), y, temperature=0.9, return_entropy=True)
        assert logp.shape == (B, L) and ent.shape == (B, L)
        (ent * g_ent.to(dt)).sum().backward()
        outs.append((logp, ent, x.grad))
    (tl_, te, tg), (nl, ne, ng) = outs
    assert_close(tl_, nl, torch.float32, "logp")
    assert_close(te, ne, torch.float32, "entropy")
    assert_close(tg, ng, torch.float32, "dh from entropy only")


def test_ops_dispatch_cpu_uses_reference():
    h, w, y = _make(9, 16, 30, torch.float32)
    a = le.ops.token_logprobs(h, w, y, temperature=0.8)
    b = token_logprobs_naive(h, w, y, temperature=0.8)
    assert torch.equal(a, b)


def _bad_inputs():
    h, w, y = _make(5, 8, 12, torch.float32)
    return [
        pytest.param(dict(lm_head_weight=w.t().contiguous()), "not transposed", id="W-transposed"),
        pytest.param(dict(lm_head_weight=w.half()), "cast", id="dtype-mismatch"),
        pytest.param(dict(targets=y.float()), "integer", id="float-targets"),
        pytest.param(dict(targets=y[:4]), "shape", id="targets-shape"),
        pytest.param(dict(targets=y + 12), "mask those tokens", id="targets-out-of-range"),
        pytest.param(dict(temperature=0.0), "temperature", id="temperature-0"),
        pytest.param(dict(lm_head_weight=w.clone().requires_grad_()), "detach", id="W-requires-grad"),
        pytest.param(dict(hidden=torch.randn(5, 5)), "hidden has d=5", id="hidden-wrong-d"),
    ]


@pytest.mark.parametrize("override,needle", _bad_inputs())
@pytest.mark.parametrize("fn", [pytest.param(token_logprobs_naive, id="naive"),
                                pytest.param(token_logprobs_triton, id="triton")])
def test_errors(fn, override, needle):
    h, w, y = _make(5, 8, 12, torch.float32)
    kwargs = dict(hidden=h, lm_head_weight=w, targets=y, temperature=1.0)
    kwargs.update(override)
    with pytest.raises(ValueError, match=needle):
        fn(**kwargs)


def test_triton_rejects_fp64():
    h, w, y = _make(5, 8, 12, torch.float64)
    with pytest.raises(ValueError, match="token_logprobs_naive"):
        token_logprobs_triton(h, w, y)


# --- backward chunking ---------------------------------------------------------------------

CHUNK_RULE = [
    # (T, V, element bytes, BLOCK_T, rows per chunk)
    pytest.param(16384, 151936, 2, 128, 512, id="V151936-bf16-min-512"),    # 155.6 MB of dz
    pytest.param(16384, 151936, 4, 64, 512, id="V151936-fp32-min-512"),
    pytest.param(16384, 100000, 2, 128, 768, id="rounds-up-not-down"),     # 671 rows fit 128 MiB
    pytest.param(16384, 32000, 2, 128, 2176, id="small-V-fills-128MiB"),
    pytest.param(16384, 2**20, 2, 128, 512, id="huge-V-keeps-the-min"),    # 1 GiB of dz
    pytest.param(300, 151936, 2, 128, 300, id="T-under-min-one-chunk"),
    pytest.param(16384, 4096, 2, 128, 16384, id="tiny-V-one-chunk"),
]


@pytest.mark.parametrize("T,V,elt,block_t,rows", CHUNK_RULE)
def test_dz_chunk_rows_rule(T, V, elt, block_t, rows):
    C = tlp.dz_chunk_rows(T, V, elt, block_t)
    assert C == rows
    if C < T:
        assert C % block_t == 0 and C >= 512  # intensity against W: 2*C/elt >= 1.7x H100's 295 FLOP/B in bf16


def test_dz_chunk_rows_bad_input():
    with pytest.raises(ValueError, match="dz_chunk_rows needs"):
        tlp.dz_chunk_rows(16, 0, 2, 16)


def _fwd_stats(T, d, V, dtype, seed=9):
    h, w, y = _make(T, d, V, dtype, seed=seed)
    logp, m, log_s, ent = tlp._logprobs_fwd(h, w, y, 0.8, True)
    g = torch.Generator().manual_seed(seed + 1)
    return h, w, y, m, log_s, ent, torch.randn(T, generator=g), torch.randn(T, generator=g)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
def test_dz_bits_do_not_depend_on_the_chunking(dtype):
    """Every row of dz comes out the same bits whatever chunk (and position in it) computes it,
    including chunks that are not a multiple of BLOCK_T (16 in the interpreter)."""
    T, d, V = 63, 48, 200
    h, w, y, m, log_s, ent, g, ge = _fwd_stats(T, d, V, dtype)
    cfg = tlp._config(dtype, T, V, h.device, backward=True)
    outs = []
    for C in (T, 5, 17, 32):
        dz = torch.empty((T, V), dtype=dtype)
        for t0 in range(0, T, C):
            t1 = min(t0 + C, T)
            chunk = torch.empty((C, V), dtype=dtype)
            tlp._dz_chunk(h, w, y, m, log_s, g, ent, ge, 1 / 0.8, t0, t1, chunk, cfg)
            dz[t0:t1] = chunk[:t1 - t0]
        outs.append(dz)
    for C, dz in zip((5, 17, 32), outs[1:]):
        assert torch.equal(dz, outs[0]), f"chunks of {C} rows changed dz"


@pytest.mark.parametrize("C", [3, 7, 16, 40, 63])
def test_backward_matches_reference_at_any_chunk_size(monkeypatch, C):
    """dh through logp and entropy at forced chunk sizes (3 rows, not a multiple of BLOCK_T, one
    chunk for all rows); dz @ W is cuBLAS's / MKL's GEMM, whose bits may depend on C."""
    monkeypatch.setattr(tlp, "dz_chunk_rows", lambda *args, **kwargs: C)
    T, d, V = 63, 48, 200
    h, w, y = _make(T, d, V, torch.float32, seed=10)
    g = torch.Generator().manual_seed(11)
    g_logp, g_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)
    _, _, dh = _run(token_logprobs_triton, h, w, y, 0.8, True, g_logp, g_ent)
    _, _, ref = _run(token_logprobs_naive, h, w, y, 0.8, True, g_logp.double(), g_ent.double(),
                     dtype=torch.float64)
    assert_close(dh, ref, torch.float32, f"dh with {C}-row chunks")


# --- forward program order -------------------------------------------------------------------

@triton.jit
def _order_probe(out_ptr, n_t, n_s, GROUP_T: tl.constexpr):
    pid = tl.program_id(0)
    pid_t, pid_s = tlp._grouped_pid(pid, n_t, n_s, GROUP_T)
    tl.store(out_ptr + 2 * pid, pid_t)
    tl.store(out_ptr + 2 * pid + 1, pid_s)


@pytest.mark.parametrize("n_t,n_s,group", [
    pytest.param(40, 9, 16, id="GPU-group-16-partial-last"),
    pytest.param(7, 3, 3, id="partial-last-group"),
    pytest.param(2, 5, 16, id="fewer-T-blocks-than-a-group"),
    pytest.param(5, 1, 1, id="group-1"),
])
def test_grouped_order_visits_every_tile_once(n_t, n_s, group):
    out = torch.full((n_t * n_s, 2), -1, dtype=torch.int32)
    _order_probe[(n_t * n_s,)](out, n_t, n_s, GROUP_T=group)
    pairs = {(int(t), int(s)) for t, s in out.tolist()}
    assert pairs == {(t, s) for t in range(n_t) for s in range(n_s)}
    # Inside a full group, consecutive programs walk T blocks of one split: they share its W tiles.
    if n_t >= group:
        assert out[:group, 1].eq(0).all() and out[:group, 0].tolist() == list(range(group))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
def test_forward_bits_do_not_depend_on_program_order(monkeypatch, dtype):
    """GROUP_T changes only which program computes which tile: the same bits, and the reference's
    values, for one group per T block, a partial last group, and one group for all."""
    T, d, V = 63, 48, 200  # 4 T blocks x 4 V splits in the interpreter
    h, w, y = _make(T, d, V, dtype, seed=12)
    config = tlp._config
    outs = []
    for group in (1, 3, 4, 16):
        monkeypatch.setattr(tlp, "_config", lambda *a, g=group, **k: {**config(*a, **k), "GROUP_T": g})
        outs.append(token_logprobs_triton(h, w, y, temperature=0.9, return_entropy=True))
    ref = token_logprobs_naive(h.double(), w.double(), y, temperature=0.9, return_entropy=True)
    for (logp, ent) in outs[1:]:
        assert torch.equal(logp, outs[0][0]) and torch.equal(ent, outs[0][1])
    assert_close(outs[0][0], ref[0], dtype, "logp")
    assert_close(outs[0][1], ref[1], dtype, "entropy")


# --- GPU: compiled kernels, bf16, production tile sizes -------------------------------------

GPU_CASES = [
    pytest.param(300, 256, 5003, 1.0, torch.bfloat16, id="bf16-V5003"),
    pytest.param(513, 320, 4096, 0.7, torch.float16, id="fp16-temp0.7"),
    pytest.param(257, 192, 3001, 1.0, torch.float32, id="fp32-ieee"),
    pytest.param(1100, 64, 151936, 1.0, torch.bfloat16, id="bf16-V151936-3-dz-chunks"),  # C = 512
]


@pytest.mark.gpu
@pytest.mark.parametrize("T,d,V,temperature,dtype", GPU_CASES)
def test_gpu_compiled_matches_reference(T, d, V, temperature, dtype):
    h, w, y = _make(T, d, V, dtype)
    h, w, y = h.cuda(), w.cuda(), y.cuda()
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(T, generator=g).cuda(), torch.randn(T, generator=g).cuda()
    logp, ent, dh = _run(token_logprobs_triton, h, w, y, temperature, True, g_logp, g_ent)
    ref_logp, ref_ent, ref_dh = _run(token_logprobs_naive, h, w, y, temperature, True,
                                     g_logp.double(), g_ent.double(), dtype=torch.float64)
    assert_close(logp, ref_logp, dtype, "logp")
    assert_close(ent, ref_ent, dtype, "entropy")
    assert_close(dh, ref_dh, dtype, "dh")


@pytest.mark.gpu
def test_gpu_memory_no_full_logits():
    """Forward + backward peak stays far below one fp32 [T, V] logits tensor (2 GiB here)."""
    T, d, V = 16384, 256, 32768
    h, w, y = _make(T, d, V, torch.bfloat16)
    h, w, y = h.cuda().requires_grad_(), w.cuda(), y.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    token_logprobs_triton(h, w, y).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < T * V * 4 / 2, f"peak {peak / 2**20:.0f} MiB"
