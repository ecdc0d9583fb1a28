"""The one tolerance helper of the test suite: relative RMS error against a reference.

A kernel may be at most ~2x as wrong as PyTorch itself in the same dtype; the table below
holds, per dtype, about twice the relative RMS error PyTorch's own matmul shows against an
fp64 computation at the test shapes. Never loosen it inside a test.
"""
import torch

TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
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
