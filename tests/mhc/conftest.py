"""mHC tests: without a CUDA GPU the Triton routing kernels run in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so it is set here at collection
time (as in ``tests/kernels/conftest.py``). GPU-only tests carry their own skip condition.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
