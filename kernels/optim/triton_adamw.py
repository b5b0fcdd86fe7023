"""Triton AdamW step of an fp32 master weight from a low-precision gradient, writing its
compute copy (``kernels.optim.adamw_step_``). One program updates ``BLOCK`` elements; the
bias corrections, learning rate and gradient scale are read from device memory when they are
tensors (a CUDA graph replays the launch with the values of the moment).

Shape legend: N elements of the flattened weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, copy_ptr, bias1_ptr, bias2_ptr, lr_ptr,
                  scale_ptr, n,
                  lr_value, beta1, beta2, eps, weight_decay,
                  LR_ON_DEVICE: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_COPY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    bias1 = tl.load(bias1_ptr).to(tl.float32)
    bias2_sqrt = tl.sqrt(tl.load(bias2_ptr).to(tl.float32))
    lr = tl.load(lr_ptr).to(tl.float32) if LR_ON_DEVICE else lr_value
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(scale_ptr).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = p * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * g * g
    p = p - (lr / bias1) * (m / (tl.sqrt(v) / bias2_sqrt + eps))
    tl.store(p_ptr + offs, p, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if HAS_COPY:
        tl.store(copy_ptr + offs, p.to(copy_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=mask)


def adamw_step_(p_N, g_N, m_N, v_N, copy_N, bias1, bias2, lr, beta1, beta2, eps,
                weight_decay, grad_scale=None) -> None:
    n = p_N.numel()
    if n == 0:
        return
    lr_on_device = torch.is_tensor(lr)
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        p_N, g_N, m_N, v_N, copy_N if copy_N is not None else p_N, bias1, bias2,
        lr if lr_on_device else bias1, grad_scale if grad_scale is not None else bias1, n,
        0.0 if lr_on_device else float(lr), float(beta1), float(beta2), float(eps),
        float(weight_decay), LR_ON_DEVICE=lr_on_device, HAS_SCALE=grad_scale is not None,
        HAS_COPY=copy_N is not None, BLOCK=BLOCK, num_warps=8)
