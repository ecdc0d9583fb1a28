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
