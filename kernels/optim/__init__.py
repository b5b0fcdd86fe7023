"""The AdamW update of an fp32 master weight from a low-precision gradient, writing the
weight's compute copy in the same pass (``adamw_step_``).

Under bf16 autocast the expert matmuls read bf16 copies of the fp32 experts and produce bf16
weight gradients. torch's fused AdamW wants gradients in the parameter's dtype, so the plain
path pays per parameter and step: a cast of the gradient to fp32 (2 B read, 4 B written), the
update (p, g, m, v read, p, m, v written: 28 B) and the next forward's cast of the weight to
bf16 (4 B read, 2 B written) — 40 B. ``adamw_step_`` reads p, m, v in fp32 and g in bf16 and
writes p, m, v and the bf16 copy: 28 B, one kernel, and nothing in the forward.

The update is torch's AdamW (decoupled weight decay, bias correction from the step count), in
fp32 whatever the gradient's dtype; the gradient is divided by ``grad_scale`` as it is read
(clipping folded into the step, as with torch's fused ``grad_scale``). The learning rate and
the bias corrections may be device tensors, so the step can be captured in a CUDA graph; nothing
synchronises with the host.

Implementations (``kernels.backend()``, ``MHC_KERNELS``): the Triton kernel
(``kernels.optim.triton_adamw``: CUDA tensors, or any under ``TRITON_INTERPRET=1``) and the
torch reference (``kernels.optim.reference``) of the same signature.

Shape legend: N elements of one (contiguous) weight, flattened.
"""

from __future__ import annotations

from collections import Counter

import torch

import kernels
from kernels.optim import reference

__all__ = ["adamw_step_", "CALLS"]

CALLS: Counter = Counter()  # "triton" / "reference": which implementation each call took


def adamw_step_(p_N: torch.Tensor, g_N: torch.Tensor, m_N: torch.Tensor, v_N: torch.Tensor,
                copy_N: torch.Tensor | None, bias1: torch.Tensor, bias2: torch.Tensor,
                lr: float | torch.Tensor, beta1: float, beta2: float, eps: float,
                weight_decay: float, grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW step of ``p_N`` (fp32, in place) with moments ``m_N``, ``v_N`` (fp32, in
    place) from gradient ``g_N`` (any float dtype); ``copy_N`` (optional, e.g. bf16) receives
    the new weight in its dtype. ``bias1`` / ``bias2``: one-element fp32 device tensors
    ``1 - beta ** step`` for the step count including this step, computed by the caller as
    torch's AdamW does (``1 - beta2 ** step`` loses most of its digits to cancellation when
    beta2 is near 1, so an in-kernel exp2/log2 would not match torch's pow). All weight-sized
    tensors contiguous, one shape."""
    for name, t in (("p", p_N), ("g", g_N), ("m", m_N), ("v", v_N), ("copy", copy_N)):
        if t is None:
            continue
        if t.shape != p_N.shape or not t.is_contiguous() or t.device != p_N.device:
            raise ValueError(f"adamw_step_: {name} must be contiguous, on {p_N.device}, of "
                             f"shape {tuple(p_N.shape)}; got {tuple(t.shape)} on {t.device}")
    if p_N.dtype != torch.float32 or m_N.dtype != torch.float32 or v_N.dtype != torch.float32:
        raise ValueError("adamw_step_: the weight and its moments must be fp32 (master "
                         f"weights); got {p_N.dtype}, {m_N.dtype}, {v_N.dtype}")
    if kernels.backend() == "triton" and (p_N.is_cuda or kernels.interpreting()):
        from kernels.optim import triton_adamw  # lazily: triton is optional

        impl, CALLS["triton"] = triton_adamw.adamw_step_, CALLS["triton"] + 1
    else:
        impl, CALLS["reference"] = reference.adamw_step_, CALLS["reference"] + 1
    impl(p_N, g_N, m_N, v_N, copy_N, bias1, bias2, lr, beta1, beta2, eps, weight_decay,
         grad_scale)
