"""Every Triton kernel compiles for Hopper (sm_90a) with the launch configurations the wrappers
pick on a GPU: the compiled path the CPU interpreter never exercises. Runs ``bench/compile_check.py``
in a subprocess (it needs TRITON_INTERPRET unset); needs Triton's NVIDIA backend and its ptxas,
not a GPU."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ["_shrink_kernel", "_expand_kernel", "_wgrad_kernel", "_wgrad_reduce_kernel", "_colscale_kernel",
           "_colscale_dg_kernel", "_colscale_dg_reduce_kernel",
           "_logprobs_fwd_kernel", "_logprobs_bwd_dz_kernel", "_policy_rows_kernel", "_policy_reduce_kernel",
           "_policy_bwd_kernel"]


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            path = get_ptxas(90).path
        except TypeError:
            path = get_ptxas().path
        return "nvidia" in backends and os.path.exists(path)
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend / ptxas not installed")


def _run(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def test_every_kernel_compiles_for_sm90a_in_every_dtype():
    res = _run(["bench/compile_check.py", "--arch", "90a", "--dtypes", "bf16,fp16,fp32"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "FAIL" not in out and " 0 failed" in out
    for name in KERNELS:
        # the policy loss takes fp32 log-probs whatever the model's dtype
        dtypes = ("float32",) if name.startswith("_policy") else ("bfloat16", "float16", "float32")
        for dt in dtypes:
            assert f"{name}[{dt}]" in out, f"{name} in {dt} was never launched"
    # bf16 launches use the tensor-core (non-IEEE) dots, fp32 the exact ones
    assert "_shrink_kernel[bfloat16] APPLY_SCALE=False BLOCK_K=64 BLOCK_R=64 BLOCK_T=64 IEEE=False" in out
    assert "_shrink_kernel[float32] APPLY_SCALE=False BLOCK_K=64 BLOCK_R=64 BLOCK_T=64 IEEE=True" in out


def test_a_kernel_the_compiler_rejects_is_reported(tmp_path):
    """The check is not vacuous: a kernel with a non-power-of-2 arange fails to compile."""
    script = tmp_path / "bad.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, triton, triton.language as tl
        sys.path.insert(0, {str(ROOT / 'bench')!r})
        from compile_check import compile_launch
        from triton.backends.compiler import GPUTarget

        @triton.jit
        def bad(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) * 2)

        x = torch.zeros(16)
        compile_launch(bad, (x,), {{"BLOCK": 16}}, GPUTarget("cuda", 90, 32))
        print("good ok")
        try:
            compile_launch(bad, (x,), {{"BLOCK": 12}}, GPUTarget("cuda", 90, 32))
        except Exception as e:
            print("bad rejected:", type(e).__name__)
    """))
    res = _run([str(script)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "good ok" in res.stdout and "bad rejected" in res.stdout
