"""Test-suite setup shared by every module.

Without CUDA, Triton kernels run on the CPU through Triton's interpreter, which must be
switched on before triton is first imported; with CUDA they compile for real. Tests
marked `gpu` are skipped without CUDA.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
