"""Test setup: on a machine without CUDA, run Triton kernels in the interpreter.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is defined, so before
``lora_engine.kernels`` is imported; conftest runs first.
"""
import os

# Before torch loads OpenMP: spinning worker threads stall small CPU ops badly when cores are
# shared (a 66x64 matmul took 24 ms with the default policy, ~11 us with PASSIVE here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def _interpreter_loops_work() -> bool:
    """Triton <= 3.6's interpreter turns a runtime int into a 1-element array and calls ``int()``
    on it in ``range(0, K, BLOCK)``; numpy >= 2.4 refuses that, so every kernel with a K loop
    fails in the interpreter (compiled GPU runs are unaffected). Probe it with such a loop."""
    import triton
    import triton.language as tl

    @triton.jit
    def count(out_ptr, K):
        acc = 0.0
        for _ in range(0, K, 1):
            acc += 1.0
        tl.store(out_ptr, acc)

    out = torch.zeros(1)
    try:
        count[(1,)](out, 3)
    except Exception:
        return False
    return out.item() == 3.0


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") == "1" and not _interpreter_loops_work():
        import numpy as np
        import triton
        pytest.exit(f"triton {triton.__version__}'s CPU interpreter cannot run with numpy "
                    f"{np.__version__}: run `pip install 'numpy<2.4'` or upgrade triton "
                    "(`pip install -U triton`), then rerun the tests.", returncode=4)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"
