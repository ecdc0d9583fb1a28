"""Triton kernels of lora-engine, importable as ``lora_engine.kernels``.

Each op folder holds ``naive.py`` (the fp32 PyTorch spec and the CPU path), the Triton
file(s), and an ``__init__`` exporting the public functions. ``lora_engine.ops`` is the only
place that decides which one runs.
"""
