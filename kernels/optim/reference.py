"""The torch reference of ``kernels.optim.adamw_step_`` (the ground truth of the tests).

Written as torch's own single-tensor AdamW (``torch.optim.adamw``, capturable form: the bias
corrections and learning rate may be tensors), on the gradient cast to fp32 and divided by
``grad_scale``; then the compute copy is cast from the new weight.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def adamw_step_(p_N, g_N, m_N, v_N, copy_N, bias1, bias2, lr, beta1, beta2, eps,
                weight_decay, grad_scale=None) -> None:
    g = g_N.float()
    if grad_scale is not None:
        g = g / grad_scale
    p_N.mul_(1 - lr * weight_decay)
    m_N.lerp_(g, 1 - beta1)
    v_N.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias2_sqrt = bias2.sqrt()
    denom = (v_N.sqrt() / bias2_sqrt).add_(eps)
    p_N.sub_(m_N / denom * (lr / bias1))
    if copy_N is not None:
        copy_N.copy_(p_N)
