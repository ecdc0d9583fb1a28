"""The one tolerance helper of the test suite: relative RMS error against a reference.

A kernel may be at most ~2x as wrong as PyTorch itself in the same dtype. TOL holds, per dtype,
twice the worst relative RMS error PyTorch's own computation shows against fp64 at the test
shapes, rounded up to one significant digit. "PyTorch's own" is the op as PyTorch computes it
from inputs in that dtype, accumulating in fp32 and rounding the result once to the output
dtype (a matmul with fp32 accumulation; the fp32 references run on the same inputs), measured
the way the tests measure (same inputs, same fp64 reference). Measured on CPU, torch 2.13.0:

    op (test shapes)                            fp32      fp16      bf16
    matmul x @ W^T, T=63 K=123 N=97             2.0e-7    2.1e-4    1.7e-3
    LoRA linear y/dx/dA/dB, test_lora_kernel    2.5e-7    3.6e-4    2.9e-3   (worst: dx)
    log-probs logp/entropy/dh, test_logprobs    2.7e-7    2.1e-4    1.7e-3   (worst: dh)
    DoRA column scale out/dy/dbias/dscale       9.4e-8    3.2e-4    3.0e-3   (worst: dbias)
    policy loss loss/dlogp/metrics              1.8e-7    3.5e-4    2.5e-3   (worst: kl / dlogp)
    worst -> x2 -> TOL                          6e-7      8e-4      6e-3

For comparison, PyTorch composed op by op in the low dtype (every intermediate rounded: x A^T
before B^T; the [T, V] logits before log_softmax) is up to 4.8e-4 / 3.4e-3 (LoRA dx, fp16 /
bf16) and 8.3e-4 / 7.1e-3 (log-probs dh); the fused kernels keep those intermediates in fp32.
fp64: matmul 3.7e-16 and k3 KL exp(d) - d - 1 1.2e-15 against 80-bit long double, so 3e-15.

Never loosen it inside a test.
"""
import torch

TOL = {
    torch.float64: 3e-15,
    torch.float32: 6e-7,
    torch.float16: 8e-4,
    torch.bfloat16: 6e-3,
}


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / max(||expected||_2, tiny), in fp64."""
    a = actual.detach().double()
    e = expected.detach().double()
    num = (a - e).pow(2).mean().sqrt()
    den = e.pow(2).mean().sqrt().clamp_min(1e-30)
    return float(num / den)


def assert_close(actual, expected, dtype, name="tensor"):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_rms(actual, expected)
    tol = TOL[dtype]
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e} ({dtype})"


def assert_as_close_as_torch(actual, torch_own, ref64, dtype, name="tensor"):
    """For results of a whole pipeline (many ops, possible cancellation), where a per-op TOL against
    another low-precision pipeline is the wrong yardstick: ``actual`` must be at most ~2x as far from
    the fp64 reference ``ref64`` as PyTorch's own computation ``torch_own`` in ``dtype`` is, plus
    TOL[dtype] / 2 of slack for results PyTorch happens to get (nearly) exact."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert torch_own.shape == ref64.shape, f"{name}: torch shape {tuple(torch_own.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    assert torch.isfinite(ref64).all(), f"{name}: non-finite fp64 reference"
    err = rel_rms(actual, ref64)
    own = rel_rms(torch_own, ref64)
    tol = 2 * own + TOL[dtype] / 2
    assert err <= tol, (f"{name}: relative RMS error vs fp64 {err:.3e} > 2 x PyTorch's own {own:.3e} "
                        f"+ TOL/2 {TOL[dtype] / 2:.1e} = {tol:.3e} ({dtype})")
