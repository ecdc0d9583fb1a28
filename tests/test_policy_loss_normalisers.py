"""The one home of the loss-type list and the per-adapter normalisers (``loss_types.py``): the
tables, ``loss_normalisers`` against counts taken here, gradient accumulation over micro-batches
rescaled by it equal to the whole batch for every loss type, and the benchmark's new types."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_close
from lora_engine.kernels.policy_loss import (LOSS_TYPES, METRIC_NAMES, NORMALISER, NORMALISERS, SURROGATE,
                                             SURROGATES, loss_normalisers, policy_loss_naive)
from policy_loss_cases import FNS, make_inputs

BENCH = Path(__file__).resolve().parents[1] / "bench"
def test_tables_cover_every_loss_type():
    assert LOSS_TYPES == ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
    assert set(SURROGATE) == set(NORMALISER) == set(LOSS_TYPES)
    assert set(SURROGATE.values()) == set(SURROGATES) and set(NORMALISER.values()) == set(NORMALISERS)


# TRL 1.16's denominators, written out per loss type from _compute_loss (n sequences, t tokens,
# c max_completion_length); grpo and sapo divide each row by its own tokens first.
TRL_DENOMINATOR = {"grpo": lambda n, t, c: n, "sapo": lambda n, t, c: n, "luspo": lambda n, t, c: n,
                   "dr_grpo": lambda n, t, c: n * c, "bnpo": lambda n, t, c: t, "dapo": lambda n, t, c: t,
                   "cispo": lambda n, t, c: t, "vespo": lambda n, t, c: t}


@pytest.mark.parametrize("mcl", [None, 20])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_normalisers_match_counts(loss_type, mcl):
    g = torch.Generator().manual_seed(0)
    B, L, A = 9, 7, 4
    mask = torch.rand(B, L, generator=g) * (torch.rand(B, L, generator=g) > 0.3)  # token weights
    ids = torch.tensor([0, 2, 0, 2, 2, 0, 1, 0, 2])  # adapter 3 has no sequence
    mask[6] = 0  # adapter 1: one sequence, no tokens
    den, tok = loss_normalisers(ids, mask, A, loss_type, mcl)
    c = L if mcl is None else mcl
    for a in range(A):
        n = sum(1 for b in range(B) if ids[b] == a)
        t = sum(float(mask[b].sum()) for b in range(B) if ids[b] == a)
        assert torch.isclose(tok[a], torch.tensor(max(t, 1.0)), rtol=1e-6), a
        want = float(max(TRL_DENOMINATOR[loss_type](n, t, c), 1.0))
        assert torch.isclose(den[a], torch.tensor(want), rtol=1e-6), a
    assert den.dtype == tok.dtype == torch.float32
    assert loss_normalisers(ids, mask, A, loss_type, mcl, dtype=torch.float64)[0].dtype == torch.float64


@pytest.mark.parametrize("kw,needle", [
    pytest.param(dict(loss_type="ppo"), "one of", id="unknown-loss-type"),
    pytest.param(dict(max_completion_length=0), "max_completion_length must be an int", id="mcl-0"),
    pytest.param(dict(max_completion_length=3.0), "max_completion_length must be an int", id="mcl-float"),
    pytest.param(dict(num_adapters=-1), "num_adapters", id="A-negative"),
    pytest.param(dict(num_adapters=2.0), "num_adapters", id="A-float"),
    pytest.param(dict(adapter_ids=torch.zeros(3, dtype=torch.long)), "one adapter id per row", id="ids-shape"),
])
def test_loss_normalisers_errors(kw, needle):
    args = dict(adapter_ids=torch.zeros(4, dtype=torch.long), mask=torch.ones(4, 5), num_adapters=1,
                loss_type="grpo")
    args.update(kw)
    with pytest.raises(ValueError, match=needle):
        loss_normalisers(**args)


@pytest.mark.parametrize("fn,dtype", FNS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_rescaled_by_loss_normalisers_give_the_whole_batch(fn, dtype, loss_type, level):
    """Gradient accumulation as the trainer does it: each micro-batch's [A] losses times
    loss_den(micro) / loss_den(whole), metrics times tok_den(micro) / tok_den(whole), summed, equal
    the whole batch's losses, metrics and gradient. Micro-batches of 4, 1 and 6 sequences: adapter
    2 is absent from the first two, and a row dropped (mask 0, as drop_zero_variance does)."""
    B, L, A, mcl = 11, 9, 3, 14
    logp, old, ref, mask, adv, _ = make_inputs(B, L, A, "masked-row", seed=13)
    ids = torch.tensor([0, 1, 0, 1, 0, 2, 2, 1, 0, 2, 1])
    kw = dict(loss_type=loss_type, importance_level=level, delta=1.5, beta=0.05, kl_correction=True,
              num_adapters=A, max_completion_length=mcl, eps_high=1.2 if loss_type == "cispo" else 0.28)
    g_out = torch.randn(A, generator=torch.Generator().manual_seed(2)).to(dtype)
    cast = lambda t: t.to(dtype)  # noqa: E731

    x_all = cast(logp).detach().requires_grad_()
    whole, whole_m = fn(x_all, cast(old), cast(adv), mask, ids, ref_logp=cast(ref), **kw)
    (whole * g_out).sum().backward()

    den_all, tok_all = loss_normalisers(ids, mask, A, loss_type, mcl, dtype=whole.dtype)
    x = cast(logp).detach().requires_grad_()
    total = torch.zeros(A, dtype=whole.dtype)
    metrics = {k: torch.zeros(A, dtype=whole.dtype) for k in METRIC_NAMES}
    for idx in (torch.arange(0, 4), torch.arange(4, 5), torch.arange(5, B)):
        losses, m = fn(x[idx], cast(old[idx]), cast(adv[idx]), mask[idx], ids[idx], ref_logp=cast(ref[idx]), **kw)
        den, tok = loss_normalisers(ids[idx], mask[idx], A, loss_type, mcl, dtype=whole.dtype)
        (losses * den / den_all * g_out).sum().backward()
        total += losses.detach() * den / den_all
        for k in METRIC_NAMES:
            metrics[k] += m[k] * tok / tok_all
    assert_close(total, whole.detach(), dtype, "accumulated losses")
    assert_close(x.grad, x_all.grad, dtype, "accumulated dlogp")
    for k in METRIC_NAMES:
        assert_close(metrics[k], whole_m[k], dtype, k)


@pytest.fixture
def bench_module(monkeypatch):
    monkeypatch.setenv("LORA_ENGINE_BENCH_QUICK", "1")
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("bench_policy_loss", None)
    return importlib.import_module("bench_policy_loss")


@pytest.mark.parametrize("loss_types", ["cispo,sapo", "luspo,vespo"])
def test_bench_runs_the_new_loss_types(bench_module, tmp_path, loss_types):
    rows = bench_module.main(["--B", "6", "--L", "9", "--A", "3", "--providers", "naive,triton",
                              "--loss-types", loss_types, "--kl-correction", "--csv", str(tmp_path / "r.csv")])
    assert {r["provider"] for r in rows} == {"naive", "triton"}
    shapes = {r["shape"] for r in rows}
    assert shapes == {f"B=6,L=9,A=3,fp32,loss={lt},klcorr" for lt in loss_types.split(",")}
    assert {r["metric"] for r in rows} == {"fwd_ms", "fwd_bwd_ms", "peak_mb", "gbps"}  # peak_mb: CUDA only
    assert all(r["value"] > 0 for r in rows if r["metric"] in ("fwd_ms", "fwd_bwd_ms"))


@pytest.mark.parametrize("kl_correction", [False, True])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bench_vectorised_baseline_is_the_same_loss(bench_module, loss_type, kl_correction):
    """The torch_compile provider's function (run eagerly here) computes the reference's loss."""
    B, L, A = 9, 12, 3
    logp, old, ref, mask, adv, ids = make_inputs(B, L, A, "masked-row", seed=14)
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    got = bench_module.vectorised_loss(x, old, adv, mask.float(), ids, ref, A, loss_type, kl_correction)
    eps_high = bench_module.CISPO_CAP if loss_type == "cispo" else bench_module.EPS_HIGH
    want, _ = policy_loss_naive(y, old, adv, mask, ids, ref_logp=ref, loss_type=loss_type,
                                eps_low=bench_module.EPS_LOW, eps_high=eps_high, beta=bench_module.BETA,
                                num_adapters=A, kl_correction=kl_correction)
    g_out = torch.tensor([0.5, -1.0, 2.0])
    (got * g_out).sum().backward()
    (want * g_out).sum().backward()
    assert_close(got, want, torch.float32, "loss")
    assert_close(x.grad, y.grad, torch.float32, "dlogp")
