"""SwiGLU of a fused gate|up projection: ``swiglu(h_NH) = silu(h[:, :F]) * h[:, F:]``.

Both FFNs (``mhc.experts``: the experts and the dense baseline) compute the gate and up
projections as one matmul into ``h_NH`` (H = 2F: gate columns, then up columns), which
reads the rows once and runs one GEMM of twice the width instead of two. The activation
then reads both halves of each row:

* eager on CUDA (and under ``TRITON_INTERPRET=1``): one Triton kernel forward
  (``kernels.mlp.triton_swiglu``: reads H, writes F) and one backward (reads H and dy,
  writes dh_NH in place of the two half-gradients and their concatenation); PyTorch's own
  ops on the strided halves are non-vectorised and the halves' backward concatenates;
* inside ``torch.compile``: the torch expression, which Inductor fuses with the casts and
  the concatenation around it (an opaque op would block that fusion);
* elsewhere (CPU, the ``torch`` backend): the same torch expression, the reference.

Computed in fp32 and rounded once to the input's dtype. The op is a ``torch.library``
custom op (``mhc::swiglu``) with a fake implementation and registered autograd, so a
compiled or CUDA-graph-captured eager step can hold it; it never synchronises with the host.

Shape legend: N rows, H = 2F columns of the fused projection, F hidden width.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

import kernels

__all__ = ["swiglu", "swiglu_reference", "CALLS"]

CALLS: Counter = Counter()  # "triton" / "reference": which implementation each call took


def swiglu_reference(h_NH: torch.Tensor) -> torch.Tensor:
    """The definition, in torch ops (differentiable)."""
    gate, up = h_NH.chunk(2, dim=-1)
    return F.silu(gate) * up


def _triton_ok(h: torch.Tensor) -> bool:
    return kernels.backend() == "triton" and (h.is_cuda or kernels.interpreting())


@torch.library.custom_op("mhc::swiglu", mutates_args=())
def _swiglu_op(h_NH: torch.Tensor) -> torch.Tensor:
    from kernels.mlp import triton_swiglu  # lazily: triton is optional

    return triton_swiglu.forward(h_NH)


@_swiglu_op.register_fake
def _(h_NH):
    return h_NH.new_empty(*h_NH.shape[:-1], h_NH.shape[-1] // 2)


@torch.library.custom_op("mhc::swiglu_backward", mutates_args=())
def _swiglu_backward_op(h_NH: torch.Tensor, dy_NF: torch.Tensor) -> torch.Tensor:
    from kernels.mlp import triton_swiglu

    return triton_swiglu.backward(h_NH, dy_NF)


@_swiglu_backward_op.register_fake
def _(h_NH, dy_NF):
    return torch.empty_like(h_NH)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy_NF):
    (h_NH,) = ctx.saved_tensors
    return torch.ops.mhc.swiglu_backward(h_NH, dy_NF)


torch.library.register_autograd("mhc::swiglu", _backward, setup_context=_setup)


def swiglu(h_NH: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the fused projection ``h_NH = [gate | up]`` (last dim even)."""
    if h_NH.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim holds gate and up halves; got {h_NH.shape[-1]}")
    if torch.compiler.is_compiling() or not _triton_ok(h_NH):
        if not torch.compiler.is_compiling():
            CALLS["reference"] += 1
        return swiglu_reference(h_NH)
    CALLS["triton"] += 1
    return torch.ops.mhc.swiglu(h_NH.contiguous())
