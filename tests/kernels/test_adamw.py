"""``kernels.optim.adamw_step_``: the Triton kernel (interpreted on CPU) and the torch
reference against ``torch.optim.AdamW`` on the same gradients cast to fp32.

Three independent paths: torch's own AdamW (the definition), our reference, our kernel. The
weight, both moments and the compute copy must agree after several steps, for float and
device-tensor learning rates, with and without a gradient scale, for sizes that do not fill
the last block; hypothesis varies the hyper-parameters.
"""

from __future__ import annotations

import pytest
import torch
from _routing_utils import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.optim import adamw_step_, triton_adamw
from kernels.optim import reference as ref


def _run(impl, n, steps, lr, betas, eps, wd, scale, lr_tensor, seed=0):
    """``steps`` updates of one weight by ``impl`` (ours) and by torch.optim.AdamW."""
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, generator=g)
    grads = [torch.randn(n, generator=g).to(torch.bfloat16) for _ in range(steps)]
    p = p0.clone().to(DEVICE)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    copy = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    step = torch.zeros((), device=DEVICE)
    lr_arg = torch.tensor(lr, device=DEVICE) if lr_tensor else lr
    scale_t = torch.tensor(scale, device=DEVICE) if scale is not None else None

    q = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([q], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for gr in grads:
        step += 1
        # in double, as torch's AdamW computes them here (1 - β**step in fp32 cancels near
        # β = 1), then as the fp32 device tensors the kernel takes
        bias1, bias2 = (torch.tensor(1 - b ** float(step), device=DEVICE) for b in betas)
        impl(p, gr.to(DEVICE), m, v, copy, bias1, bias2, lr_arg, *betas, eps, wd, scale_t)
        q.grad = gr.float() / (scale if scale is not None else 1.0)
        opt.step()
    st_ = opt.state[q]
    return (p.cpu(), m.cpu(), v.cpu(), copy.cpu()), (q.detach(), st_["exp_avg"],
                                                    st_["exp_avg_sq"])


def _assert_is_copy(copy, p, exact):
    """``copy`` = the new weight rounded to bf16 as ``Tensor.to`` rounds it (to nearest
    even; Triton on a GPU too). Triton's CPU interpreter truncates fp32 -> bf16 instead, so
    there the copy is checked to within one bf16 step below |p|."""
    if exact:
        assert torch.equal(copy, p.to(torch.bfloat16))
        return
    step = torch.finfo(torch.bfloat16).eps * p.abs()
    assert ((copy.float() - p).abs() <= step).all()
    assert (copy.float().abs() <= p.abs()).all()  # truncation: toward zero


IMPLS = {"triton": triton_adamw.adamw_step_, "reference": ref.adamw_step_}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lr_tensor", [False, True])
@pytest.mark.parametrize("scale", [None, 3.0])
def test_matches_torch_adamw(impl, lr_tensor, scale):
    n = triton_adamw.BLOCK * 2 + 77  # the last block part-filled
    (p, m, v, copy), (q, mq, vq) = _run(IMPLS[impl], n, 4, 1e-2, (0.9, 0.95), 1e-8, 0.1,
                                        scale, lr_tensor)
    torch.testing.assert_close(m, mq, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(v, vq, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    _assert_is_copy(copy, p, exact=impl == "reference" or DEVICE != "cpu")
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(0))
    assert (p - p0).abs().mean() > 1e-2  # the steps moved the weight (4 of lr 1e-2)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3000), steps=st.integers(1, 5), lr=st.floats(1e-4, 5e-2),
       beta1=st.floats(0.5, 0.99), beta2=st.floats(0.9, 0.9999), wd=st.floats(0.0, 0.2),
       seed=st.integers(0, 2**16))
def test_kernel_equals_reference(n, steps, lr, beta1, beta2, wd, seed):
    args = dict(n=n, steps=steps, lr=lr, betas=(beta1, beta2), eps=1e-8, wd=wd, scale=2.0,
                lr_tensor=True, seed=seed)
    ours, torch_ = _run(triton_adamw.adamw_step_, **args)
    refs, _ = _run(ref.adamw_step_, **args)
    for a, b in zip(ours[:3], refs[:3], strict=True):  # weight, moments
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)
    _assert_is_copy(ours[3], ours[0], exact=DEVICE != "cpu")
    torch.testing.assert_close(ours[0], torch_[0], rtol=2e-5, atol=1e-6)


def test_bad_operands_are_refused():
    p = torch.zeros(8, device=DEVICE)
    m, v, bias = torch.zeros_like(p), torch.zeros_like(p), torch.ones((), device=DEVICE)
    with pytest.raises(ValueError, match="g must be contiguous"):
        adamw_step_(p, torch.zeros(16, device=DEVICE)[::2], m, v, None, bias, bias, 1e-3,
                    0.9, 0.95, 1e-8, 0.0)
    with pytest.raises(ValueError, match="must be fp32"):
        adamw_step_(p.half(), p, m, v, None, bias, bias, 1e-3, 0.9, 0.95, 1e-8, 0.0)
    assert torch.equal(p, torch.zeros(8, device=DEVICE))  # nothing changed
