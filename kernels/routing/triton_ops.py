"""Triton implementation of the routing ops, with the reference's signatures and semantics.

Shape legend: see ``kernels/__init__.py``. ``kernels.routing.ops`` dispatches here when
``MHC_KERNELS`` resolves to ``triton``. The kernels live in ``triton_gate`` (fused router
projection + two-level gating, forward and backward), ``triton_permute`` (sort, gather,
combine) and ``triton_grouped`` (``torch._grouped_mm`` on CUDA, loop elsewhere).
"""

from __future__ import annotations

from kernels.routing.triton_gate import gate, route
from kernels.routing.triton_grouped import grouped_mm
from kernels.routing.triton_permute import combine, expert_counts, permute

__all__ = ["route", "gate", "permute", "combine", "grouped_mm", "expert_counts"]
