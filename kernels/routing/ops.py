"""Public routing ops: the one seam where the model reaches the routing implementation.

The routing ops (``route``, ``gate``, ``permute``, ``combine``, ``expert_counts``) dispatch on
``kernels.backend()`` (``MHC_KERNELS=auto|triton|torch``) to the Triton custom ops
(``triton_ops``) or to the torch reference with the same signature. ``grouped_mm`` is one op
for both backends (``kernels.routing.grouped``): ``torch._grouped_mm`` on CUDA bf16, the
reference loop elsewhere. Every path here is free of host syncs on CUDA and traceable by
``torch.compile(fullgraph=True)``. Shape legend: see ``kernels/__init__.py``.
"""

from __future__ import annotations

import torch

import kernels
from kernels.routing import reference
from kernels.routing.grouped import grouped_mm
from kernels.routing.reference import GateSpec

__all__ = ["route", "gate", "permute", "combine", "grouped_mm", "expert_counts"]


def _impl(tensor: torch.Tensor):
    """Triton for CUDA tensors (or any tensor under TRITON_INTERPRET=1), else the reference:
    a CPU model on a GPU machine keeps working with MHC_KERNELS=auto."""
    if kernels.backend() == "triton" and (tensor.is_cuda or kernels.interpreting()):
        from kernels.routing import triton_ops  # imported lazily: triton is optional

        return triton_ops
    return reference


def route(
    x_TD: torch.Tensor,
    w_DR: torch.Tensor,
    spec: GateSpec,
    bias_R: torch.Tensor | None = None,
    forced_groups_TK1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router projection + two-level selection -> ``(weights_TK, ids_TK, logits_TR)``."""
    return _impl(x_TD).route(x_TD, w_DR, spec, bias_R, forced_groups_TK1)


def gate(
    logits_TR: torch.Tensor,
    spec: GateSpec,
    bias_R: torch.Tensor | None = None,
    forced_groups_TK1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection from precomputed logits -> ``(weights_TK, ids_TK)``."""
    return _impl(logits_TR).gate(logits_TR, spec, bias_R, forced_groups_TK1)


def permute(
    x_TD: torch.Tensor, ids_TK: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather token copies into expert order -> ``(x_ND, order_N, counts_E)``."""
    return _impl(x_TD).permute(x_TD, ids_TK, n_experts)


def combine(y_ND: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Weighted combine of expert outputs back to token order -> ``y_TD``."""
    return _impl(y_ND).combine(y_ND, order_N, weights_TK)


def expert_counts(ids_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert -> int64 ``counts_E`` (no host sync)."""
    return _impl(ids_TK).expert_counts(ids_TK, n_experts)
