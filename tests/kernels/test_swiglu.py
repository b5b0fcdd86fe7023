"""``kernels.mlp.swiglu``: the Triton kernel (interpreted on CPU) against the torch
definition, forward and gradient, for shapes that do not fill the kernel's blocks; the
custom op's schema, fake implementation and autograd (``torch.library.opcheck``); and that
the public function takes the kernel where it should and the torch expression elsewhere.
On a GPU (marked ``gpu``) the same comparison in bf16 on CUDA."""

from __future__ import annotations

import pytest
import torch
from _routing_utils import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
import kernels.mlp
from kernels.mlp import swiglu, swiglu_reference, triton_swiglu


def _pair(n, f, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, 2 * f, generator=g) * 3).to(dtype).to(device)
    dy = torch.randn(n, f, generator=g).to(dtype).to(device)
    return h, dy


def _reference_fp32(h, dy):
    """The definition in fp32 (the kernel's arithmetic), rounded once to h's dtype."""
    h32 = h.detach().float().requires_grad_()
    y = swiglu_reference(h32)
    (dh,) = torch.autograd.grad(y, h32, dy.float())
    return y.to(h.dtype), dh.to(h.dtype)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 9), f=st.integers(1, 700), seed=st.integers(0, 2**16))
def test_kernel_equals_the_definition_fp32(n, f, seed):
    h, dy = _pair(n, f, torch.float32, seed=seed)
    y = triton_swiglu.forward(h)
    dh = triton_swiglu.backward(h, dy)
    y_ref, dh_ref = _reference_fp32(h, dy)
    assert y.shape == (n, f) and dh.shape == (n, 2 * f)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-5, atol=1e-6)


def test_kernel_bf16_rounds_once():
    h, dy = _pair(37, 300, torch.bfloat16)
    y_ref, dh_ref = _reference_fp32(h, dy)
    y, dh = triton_swiglu.forward(h), triton_swiglu.backward(h, dy)
    # one rounding to bf16 of the same fp32 value: equal, or one bf16 step apart (the CPU
    # interpreter truncates where a GPU rounds to nearest)
    step = torch.finfo(torch.bfloat16).eps
    for got, want in ((y, y_ref), (dh, dh_ref)):
        gap = (got.float() - want.float()).abs()
        assert (gap <= step * want.float().abs() + 1e-30).all()
        assert (got != want).float().mean() < 0.6  # most values equal, not merely close


def test_public_function_is_differentiable_and_takes_the_kernel():
    prev = kernels.backend()
    try:
        kernels.set_backend("triton")  # CUDA, or the interpreter on CPU
        h, dy = _pair(5, 24, torch.float32)
        h = h.requires_grad_()
        kernels.mlp.CALLS.clear()
        y = swiglu(h)
        (dh,) = torch.autograd.grad(y, h, dy)
        assert kernels.mlp.CALLS == {"triton": 1}
        y_ref, dh_ref = _reference_fp32(h, dy)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(dh, dh_ref)
        kernels.set_backend("torch")
        kernels.mlp.CALLS.clear()
        torch.testing.assert_close(swiglu(h), y_ref)
        assert kernels.mlp.CALLS == {"reference": 1}
    finally:
        kernels.set_backend(prev)


def test_opcheck():
    h, dy = _pair(6, 20, torch.float32)
    torch.library.opcheck(torch.ops.mhc.swiglu, (h.requires_grad_(),))
    torch.library.opcheck(torch.ops.mhc.swiglu_backward, (h.detach(), dy))


def test_odd_width_is_a_clear_error():
    with pytest.raises(ValueError, match="gate and up halves"):
        swiglu(torch.zeros(2, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_on_gpu_bf16():
    h, dy = _pair(65536 // 16, 512, torch.bfloat16, device="cuda")
    y_ref, dh_ref = _reference_fp32(h, dy)
    y, dh = triton_swiglu.forward(h), triton_swiglu.backward(h, dy)
    # a GPU rounds to nearest even as Tensor.to does: the same bf16 values
    assert torch.equal(y, y_ref)
    assert (dh != dh_ref).float().mean() < 1e-3  # fp32 op-order differences only
    torch.testing.assert_close(dh, dh_ref, rtol=8e-3, atol=1e-5)
