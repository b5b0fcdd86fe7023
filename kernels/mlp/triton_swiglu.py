"""Triton SwiGLU over the fused gate|up rows (``kernels.mlp.swiglu``). One program handles
``BLOCK_M`` rows × ``BLOCK_F`` columns of the output; the gate value of column j is at j and
its up value at F + j of the same row. fp32 arithmetic, one rounding to the output dtype.

Shape legend: N rows, H = 2F, F hidden width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_F = 4, 512


@triton.jit
def _swiglu_fwd_kernel(h_ptr, y_ptr, n_rows, F, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < F)
    at = rows[:, None] * (2 * F) + cols[None, :]
    g = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + at + F, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + rows[:, None] * F + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(h_ptr, dy_ptr, dh_ptr, n_rows, F, BLOCK_M: tl.constexpr,
                       BLOCK_F: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < F)
    at = rows[:, None] * (2 * F) + cols[None, :]
    g = tl.load(h_ptr + at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptr + at + F, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows[:, None] * F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(dh_ptr + at, dg.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + at + F, du.to(dh_ptr.dtype.element_ty), mask=mask)


def _grid(n_rows: int, F: int):
    return (triton.cdiv(n_rows, BLOCK_M), triton.cdiv(F, BLOCK_F))


def forward(h_NH: torch.Tensor) -> torch.Tensor:
    F = h_NH.shape[-1] // 2
    h = h_NH.reshape(-1, 2 * F)
    y = h.new_empty(h.shape[0], F)
    if y.numel():
        _swiglu_fwd_kernel[_grid(h.shape[0], F)](h, y, h.shape[0], F, BLOCK_M=BLOCK_M,
                                                 BLOCK_F=BLOCK_F, num_warps=4)
    return y.view(*h_NH.shape[:-1], F)


def backward(h_NH: torch.Tensor, dy_NF: torch.Tensor) -> torch.Tensor:
    F = h_NH.shape[-1] // 2
    h = h_NH.reshape(-1, 2 * F)
    dy = dy_NF.reshape(-1, F).contiguous()
    dh = torch.empty_like(h)
    if dh.numel():
        _swiglu_bwd_kernel[_grid(h.shape[0], F)](h, dy, dh, h.shape[0], F, BLOCK_M=BLOCK_M,
                                                 BLOCK_F=BLOCK_F, num_warps=4)
    return dh.view(h_NH.shape)
