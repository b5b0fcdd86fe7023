"""Triton permutation (sort, gather, combine) and grouped matmul against the torch reference.

Order, inverse and counts must equal the reference's stable sort exactly; the gathered rows
are copies (exact); combine within the per-dtype tolerance; gradients against reference
autograd; results bit-identical across runs (no order-dependent atomics).
"""

from __future__ import annotations

import pytest
import torch
from _routing_utils import DEVICE, DTYPES, GRAD_TOL, assert_close, distinct_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from kernels.routing import grouped as tgm
from kernels.routing import ops
from kernels.routing import reference as ref
from kernels.routing import triton_ops as tp
from kernels.routing.reference import GateSpec


def _case(T, K, E, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    ids = distinct_ids(T, K, E, g).to(DEVICE)
    x = torch.randn(T, D, generator=g).to(dtype).to(DEVICE)
    w = torch.rand(T, K, generator=g).to(dtype).to(DEVICE)
    return x, ids, w


def _check(T, K, E, D, dtype, seed=0):
    x, ids, w = _case(T, K, E, D, dtype, seed)
    # gradients are compared with the reference run in fp32 on the same (rounded) inputs:
    # the reference's bf16 autograd rounds every product, ours accumulates in fp32
    xa, xb = x.clone().requires_grad_(), x.float().requires_grad_()
    wa, wb = w.clone().requires_grad_(), w.float().requires_grad_()
    x_nd, order, counts = tp.permute(xa, ids, E)
    x_ndr, orderr, countsr = ref.permute(xb, ids, E)
    assert torch.equal(order, orderr)
    assert torch.equal(counts, countsr)
    assert torch.equal(x_nd, x_ndr.to(dtype))
    scale = torch.linspace(0.5, 1.5, D, device=DEVICE, dtype=dtype)
    y = x_nd * scale
    yr = x_ndr * scale.float()
    yr = yr + (y.float() - yr).detach()  # same values as y (rounded), gradient to x_ndr
    out = tp.combine(y, order, wa)
    outr = ref.combine(yr, orderr, wb)
    assert out.dtype == dtype
    assert_close(out, outr.to(dtype), dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(T, D, generator=g).to(dtype).to(DEVICE)
    (out.float() * dout).sum().backward()
    (outr.float() * dout).sum().backward()
    if T:
        assert_close(xa.grad, xb.grad, dtype=dtype, table=GRAD_TOL)
        assert_close(wa.grad, wb.grad, dtype=dtype, table=GRAD_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,K,E,D", [(0, 2, 4, 8), (1, 1, 1, 8), (1, 3, 5, 7), (7, 2, 6, 33),
                                     (45, 4, 13, 20), (70, 8, 64, 16)])
def test_permute_combine_matches_reference(T, K, E, D, dtype):
    _check(T, K, E, D, dtype)


def test_permute_crosses_blocks():
    """More than one block of slots (128 per block): offsets chain across blocks."""
    _check(90, 3, 5, 8, torch.float32, seed=3)


def test_permute_skewed_and_empty_experts():
    T, E, D = 40, 9, 8
    ids = torch.tensor([[0, 3]] * 30 + [[3, 8]] * 10, device=DEVICE)
    x = torch.randn(T, D, device=DEVICE)
    a, b = tp.permute(x, ids, E), ref.permute(x, ids, E)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert a[2].tolist() == [30, 0, 0, 40, 0, 0, 0, 0, 10]


def test_deterministic():
    x, ids, w = _case(60, 4, 11, 24, torch.float32, seed=5)
    runs = []
    for _ in range(2):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        x_nd, order, counts = tp.permute(xa, ids, 11)
        out = tp.combine(x_nd * 1.25, order, wa)
        out.sum().backward()
        runs.append((out, xa.grad, wa.grad))
    for u, v in zip(*runs, strict=True):
        assert torch.equal(u, v)


def test_expert_counts():
    g = torch.Generator().manual_seed(6)
    ids = distinct_ids(33, 3, 10, g).to(DEVICE)
    assert torch.equal(tp.expert_counts(ids, 10), ref.expert_counts(ids, 10))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(0, 40), E=st.integers(1, 20), D=st.integers(1, 24),
       kf=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_permute_property(T, E, D, kf, seed):
    K = 1 + int(kf * (min(E, 8) - 1))
    _check(T, K, E, D, torch.float32, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grouped_mm_matches_reference(dtype):
    g = torch.Generator().manual_seed(7)
    counts = torch.tensor([3, 0, 5, 1], device=DEVICE)
    x = torch.randn(9, 16, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(4, 16, 8, generator=g).to(dtype).to(DEVICE)
    assert_close(tgm.grouped_mm(x, w, counts), ref.grouped_mm(x, w, counts), table=GRAD_TOL)


def test_ops_dispatch_triton():
    prev = kernels.backend()
    try:
        kernels.set_backend("triton")
        spec = GateSpec("two_level", 4, 4, 1, 2)
        x = torch.randn(5, 16, device=DEVICE)
        w = torch.randn(16, spec.n_router_outputs, device=DEVICE)
        weights, ids, logits = ops.route(x, w, spec)
        x_nd, order, counts = ops.permute(x, ids, spec.n_experts)
        y = ops.combine(x_nd, order, weights)
        assert_close(y, x * weights.sum(1, keepdim=True))  # identity experts
    finally:
        kernels.set_backend(prev)


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,E,D", [(16384, 8, 256, 1024), (4097, 2, 64, 4096)])
def test_gpu_permute_combine_large(T, K, E, D):
    _check(T, K, E, D, torch.bfloat16, seed=8)


@pytest.mark.gpu
@pytest.mark.parametrize("A,B", [(256, 128), (20, 12), (8, 4)])  # odd widths are zero-padded
def test_gpu_grouped_mm_fast_path(A, B):
    g = torch.Generator().manual_seed(9)
    counts = torch.tensor([700, 0, 1, 1323, 16, 5], device="cuda")
    N = int(counts.sum())
    x = torch.randn(N, A, generator=g).bfloat16().cuda()
    w = (torch.randn(6, A, B, generator=g) / A**0.5).bfloat16().cuda()
    assert tgm.fast_path_ok(x, w)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    wa, wb = w.clone().requires_grad_(), w.clone().requires_grad_()
    before = dict(tgm.CALLS)
    ya, yb = tgm.grouped_mm(xa, wa, counts), ref.grouped_mm(xb, wb, counts)
    assert ya.shape == (N, B) and ya.is_contiguous()
    assert_close(ya, yb, table=GRAD_TOL)
    dy = torch.randn_like(ya)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    assert_close(xa.grad, xb.grad, table=GRAD_TOL)
    torch.testing.assert_close(wa.grad.float(), wb.grad.float(), rtol=5e-2, atol=0.1)
    assert wa.grad[1].abs().max() == 0  # the empty group
    assert tgm.CALLS["fast"] == before.get("fast", 0) + 1
    assert tgm.CALLS["fast_backward"] == before.get("fast_backward", 0) + 1
    assert tgm.CALLS["loop"] == before.get("loop", 0)
