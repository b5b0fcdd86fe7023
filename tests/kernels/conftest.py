"""Kernel tests: on a machine without CUDA, run Triton kernels in the interpreter.

``TRITON_INTERPRET=1`` must be set before triton (or any kernel module) is imported, so it is
set here, at collection time, when no CUDA GPU is visible. Tests marked ``gpu`` are skipped
without one.
"""

from __future__ import annotations

import os


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
