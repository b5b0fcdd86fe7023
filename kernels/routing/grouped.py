"""Grouped expert matmul, the custom op ``mhc::grouped_mm``: ``torch._grouped_mm`` on CUDA
bf16, the reference's per-group loop everywhere else.

Shape legend (see ``kernels/__init__.py``): N routed rows (expert-sorted), G groups (experts),
A input width, B output width. ``y_NB[rows of g] = x_NA[rows of g] @ w_GAB[g]``.

``torch._grouped_mm`` (CUTLASS grouped GEMM, sm90) takes bf16 operands, int32 cumulative
``offs`` (end row of each group; any group size, zero included) and 16-byte-aligned strides;
widths that are not multiples of 8 are zero-padded here (a low rank of 4, say), so every CUDA
bf16 call takes it. Its backward is ours: ``dx = grouped_mm(dy, w^T)`` and
``dw[g] = x_g^T dy_g`` (the 2-D × 2-D form, offsets along the contraction), with no host
synchronization (CUDA-graph capturable). The loop (CPU, fp32/fp16 on CUDA) syncs once for
the counts; it is the reference and the CPU path, and opaque to ``torch.compile`` (the op has
a fake implementation), so a compiled CPU model traces through it too.

It is one op for both ``MHC_KERNELS`` backends: there is no Triton grouped GEMM (the issue
asked for one only where it beats ``_grouped_mm``, 557–632 TFLOP/s at our shapes).
``CALLS`` counts which path each call took (forward and backward), for the tests that assert
a training step never leaves the fast path.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from kernels.routing import reference

CALLS: Counter = Counter()  # "fast" / "fast_backward" / "loop" / "loop_backward"


def fast_path_ok(x_NA: torch.Tensor, w_GAB: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands (after padding)."""
    return (hasattr(torch, "_grouped_mm") and x_NA.is_cuda and x_NA.dtype == torch.bfloat16
            and w_GAB.dtype == torch.bfloat16)


def _pad_to_8(t: torch.Tensor, dim: int) -> torch.Tensor:
    extra = -t.shape[dim] % 8
    if not extra:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra]
    return F.pad(t, pad)


def _offs(counts_G: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts_G, 0).to(torch.int32)


def _fast(x_NA, w_GAB, counts_G):
    N, B = x_NA.shape[0], w_GAB.shape[2]
    if N == 0:
        return x_NA.new_zeros(0, B)
    x = _pad_to_8(x_NA.contiguous(), 1)
    w = _pad_to_8(_pad_to_8(w_GAB, 1), 2)
    y = torch._grouped_mm(x, w, offs=_offs(counts_G))
    return y if y.shape[1] == B else y[:, :B].contiguous()


def _fast_backward(dy_NB, x_NA, w_GAB, counts_G):
    N, A = x_NA.shape
    if N == 0:
        return x_NA.new_zeros(0, A), torch.zeros_like(w_GAB)
    dy = _pad_to_8(dy_NB.contiguous(), 1)
    x = _pad_to_8(x_NA.contiguous(), 1)
    w = _pad_to_8(_pad_to_8(w_GAB, 1), 2)
    offs = _offs(counts_G)
    dx = torch._grouped_mm(dy, w.transpose(-2, -1), offs=offs)
    dw = torch._grouped_mm(x.t(), dy, offs=offs)
    B = w_GAB.shape[2]
    return dx[:, :A].contiguous(), dw[:, :A, :B].contiguous()


def _loop_backward(dy_NB, x_NA, w_GAB, counts_G):
    dx = reference.grouped_mm(dy_NB, w_GAB.transpose(-2, -1), counts_G)
    dw = torch.zeros_like(w_GAB)
    start = 0
    for g, n in enumerate(counts_G.tolist()):
        if n:
            dw[g] = x_NA[start:start + n].t() @ dy_NB[start:start + n]
        start += n
    return dx, dw


@torch.library.custom_op("mhc::grouped_mm", mutates_args=())
def _grouped_mm_op(x_NA: torch.Tensor, w_GAB: torch.Tensor, counts_G: torch.Tensor
                   ) -> torch.Tensor:
    if fast_path_ok(x_NA, w_GAB):
        CALLS["fast"] += 1
        return _fast(x_NA, w_GAB, counts_G)
    CALLS["loop"] += 1
    return reference.grouped_mm(x_NA, w_GAB, counts_G).contiguous()


@_grouped_mm_op.register_fake
def _(x_NA, w_GAB, counts_G):
    return x_NA.new_empty(x_NA.shape[0], w_GAB.shape[2])


@torch.library.custom_op("mhc::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward_op(dy_NB: torch.Tensor, x_NA: torch.Tensor, w_GAB: torch.Tensor,
                            counts_G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if fast_path_ok(x_NA, w_GAB):
        CALLS["fast_backward"] += 1
        return _fast_backward(dy_NB.to(x_NA.dtype), x_NA, w_GAB, counts_G)
    CALLS["loop_backward"] += 1
    return _loop_backward(dy_NB.to(x_NA.dtype), x_NA, w_GAB, counts_G)


@_grouped_mm_backward_op.register_fake
def _(dy_NB, x_NA, w_GAB, counts_G):
    return torch.empty_like(x_NA), torch.empty_like(w_GAB)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy_NB):
    x_NA, w_GAB, counts_G = ctx.saved_tensors
    dx, dw = torch.ops.mhc.grouped_mm_backward(dy_NB, x_NA, w_GAB, counts_G)
    return dx, dw, None


torch.library.register_autograd("mhc::grouped_mm", _backward, setup_context=_setup)


def grouped_mm(x_NA: torch.Tensor, w_GAB: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
    """Same signature and result as ``reference.grouped_mm`` (differentiable in x and w)."""
    if x_NA.shape[1] != w_GAB.shape[1]:
        raise ValueError(f"x has {x_NA.shape[1]} columns, w_GAB expects {w_GAB.shape[1]}")
    if counts_G.shape != (w_GAB.shape[0],):
        raise ValueError(f"counts_G must have {w_GAB.shape[0]} entries (one per group)")
    return torch.ops.mhc.grouped_mm(x_NA, w_GAB, counts_G)
