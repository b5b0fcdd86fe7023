"""Triton token permutation: histogram, offsets, expert order + inverse, gather, weighted combine.

Shape legend (see ``kernels/__init__.py``): T tokens, D model dim, E experts, K picks per
token, N = T·K routed rows (slot n = t·K + k of the flattened ``ids_TK``), B slot blocks of
``BN`` slots, BD a chunk of D.

Ordering is exactly the reference's stable sort: rows grouped by ascending expert, and within
an expert by ascending slot. Row of slot n = start[e] + base[b, e] + rank[n], where e = its
expert, b = its block, start = exclusive cumsum of the expert counts, base[b, e] = slots of
expert e in blocks before b (a column scan), rank = earlier slots of e inside block b.
Everything is integer arithmetic on disjoint outputs: no atomics, fully deterministic, and no
host synchronization (CUDA-graph capturable). Weighted combine sums the K copies of a token in
k order in fp32 (no scatter-add), so it is deterministic too.

Kernels: ``_hist_rank_kernel``, ``_col_scan_kernel``, ``_pos_kernel`` (the sort),
``_scatter_rows_kernel`` (gather into expert order: reads each token row once, writes its K
copies), ``_gather_sum_kernel`` (weighted combine / backward of the gather),
``_combine_bwd_kernel``, ``_invert_kernel``; launchers ``sort_slots`` / ``scatter_rows`` /
``gather_sum`` / ``combine_bwd`` / ``invert``. The custom ops with autograd (``mhc::permute``,
``mhc::combine``, ``mhc::expert_counts``) and the public functions are in ``triton_ops``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BN = 128  # slots per block for the histogram / in-block rank


@triton.jit
def _hist_rank_kernel(ids_ptr, bc_ptr, rank_ptr, N, E: tl.constexpr, EP: tl.constexpr,
                      BN: tl.constexpr):
    """Per block of BN slots: histogram over experts -> bc[b, :], and each slot's rank among
    the earlier slots of the same expert in the block."""
    b = tl.program_id(0)
    i = b * BN + tl.arange(0, BN)
    m = i < N
    e = tl.load(ids_ptr + i, mask=m, other=0).to(tl.int32)
    h = tl.histogram(e, EP, mask=m)
    ee = tl.arange(0, EP)
    tl.store(bc_ptr + b * E + ee, h, mask=ee < E)
    li = tl.arange(0, BN)
    same = (e[:, None] == e[None, :]) & (li[None, :] < li[:, None]) & m[None, :]
    r = tl.sum(same.to(tl.int32), axis=1)
    tl.store(rank_ptr + i, r, mask=m)


@triton.jit
def _col_scan_kernel(bc_ptr, base_ptr, counts_ptr, NB, E: tl.constexpr, BE: tl.constexpr,
                     BB: tl.constexpr, NITER: tl.constexpr):
    """Exclusive scan over blocks of each expert column; totals -> counts. (NITER is a
    power-of-two bucket of cdiv(NB, BB): a constexpr trip count, few recompiles.)"""
    ee = tl.program_id(0) * BE + tl.arange(0, BE)
    me = ee < E
    carry = tl.zeros([BE], dtype=tl.int32)
    for it in range(NITER):
        bb = it * BB + tl.arange(0, BB)
        msk = (bb[:, None] < NB) & me[None, :]
        v = tl.load(bc_ptr + bb[:, None] * E + ee[None, :], mask=msk, other=0)
        inc = tl.cumsum(v, axis=0)
        tl.store(base_ptr + bb[:, None] * E + ee[None, :], inc - v + carry[None, :], mask=msk)
        carry += tl.sum(v, axis=0)
    tl.store(counts_ptr + ee, carry.to(counts_ptr.dtype.element_ty), mask=me)


@triton.jit
def _pos_kernel(ids_ptr, base_ptr, rank_ptr, counts_ptr, order_ptr, inv_ptr, N,
                E: tl.constexpr, EP: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr):
    """row = start[e] + base[b, e] + rank; order[row] = slot; inv[slot] = row."""
    ee = tl.arange(0, EP)
    cnt = tl.load(counts_ptr + ee, mask=ee < E, other=0).to(tl.int32)
    start = tl.cumsum(cnt, axis=0) - cnt
    i = tl.program_id(0) * BS + tl.arange(0, BS)
    m = i < N
    e = tl.load(ids_ptr + i, mask=m, other=0).to(tl.int32)
    st = tl.sum(tl.where(ee[None, :] == e[:, None], start[None, :], 0), axis=1)
    base = tl.load(base_ptr + (i // BN) * E + e, mask=m, other=0)
    r = tl.load(rank_ptr + i, mask=m, other=0)
    row = st + base + r
    tl.store(inv_ptr + i, row, mask=m)
    tl.store(order_ptr + row, i.to(tl.int64), mask=m)


@triton.jit
def _scatter_rows_kernel(x_ptr, inv_ptr, out_ptr, D, K: tl.constexpr, BD: tl.constexpr):
    """out[inv[t·K + k]] = x[t] for every k: x row read once, K rows written."""
    t = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = d < D
    xr = tl.load(x_ptr + t.to(tl.int64) * D + d, mask=md)
    for k in tl.static_range(K):
        row = tl.load(inv_ptr + t * K + k).to(tl.int64)
        tl.store(out_ptr + row * D + d, xr, mask=md)


@triton.jit
def _gather_sum_kernel(y_ptr, inv_ptr, w_ptr, out_ptr, D, K: tl.constexpr, BD: tl.constexpr,
                       HAS_W: tl.constexpr):
    """out[t] = Σ_k w[t, k] · y[inv[t·K + k]] in k order, fp32 accumulate."""
    t = tl.program_id(0)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    md = d < D
    acc = tl.zeros([BD], dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(inv_ptr + t * K + k).to(tl.int64)
        yr = tl.load(y_ptr + row * D + d, mask=md, other=0.0).to(tl.float32)
        if HAS_W:
            yr = yr * tl.load(w_ptr + t * K + k).to(tl.float32)
        acc += yr
    tl.store(out_ptr + t.to(tl.int64) * D + d, acc.to(out_ptr.dtype.element_ty), mask=md)


@triton.jit
def _combine_bwd_kernel(dout_ptr, y_ptr, inv_ptr, w_ptr, dy_ptr, dw_ptr, D: tl.constexpr,
                        K: tl.constexpr, KP: tl.constexpr, BD: tl.constexpr):
    """dy[inv[t·K + k]] = w[t, k] · dout[t];  dw[t, k] = <y[inv[t·K + k]], dout[t]>."""
    t = tl.program_id(0)
    kk = tl.arange(0, KP)
    dw = tl.zeros([KP], dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        md = d < D
        g = tl.load(dout_ptr + t.to(tl.int64) * D + d, mask=md, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            row = tl.load(inv_ptr + t * K + k).to(tl.int64)
            wk = tl.load(w_ptr + t * K + k).to(tl.float32)
            tl.store(dy_ptr + row * D + d, (g * wk).to(dy_ptr.dtype.element_ty), mask=md)
            yr = tl.load(y_ptr + row * D + d, mask=md, other=0.0).to(tl.float32)
            dw += tl.where(kk == k, tl.sum(yr * g, axis=0), 0.0)
    tl.store(dw_ptr + t * K + kk, dw.to(dw_ptr.dtype.element_ty), mask=kk < K)


@triton.jit
def _invert_kernel(order_ptr, inv_ptr, N, BS: tl.constexpr):
    i = tl.program_id(0) * BS + tl.arange(0, BS)
    m = i < N
    s = tl.load(order_ptr + i, mask=m, other=0)
    tl.store(inv_ptr + s, i, mask=m)


# ----------------------------------------------------------------------------- launchers


def _bd(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), 2048)


def _warps(bd: int) -> int:
    return max(1, min(8, bd // 256))


def sort_slots(ids_TK: torch.Tensor, n_experts: int):
    """Stable sort of the flattened slots by expert: ``(order_N int64, inv_N int32, counts_E
    int64)``; ``order_N[inv_N[n]] == n``."""
    ids = ids_TK.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    N, E, dev = ids.numel(), n_experts, ids.device
    counts = torch.zeros(E, dtype=torch.int64, device=dev)
    order = torch.empty(N, dtype=torch.int64, device=dev)
    inv = torch.empty(N, dtype=torch.int32, device=dev)
    if N == 0:
        return order, inv, counts
    EP = triton.next_power_of_2(E)
    NB = triton.cdiv(N, _BN)
    bc = torch.empty(NB, E, dtype=torch.int32, device=dev)
    base = torch.empty(NB, E, dtype=torch.int32, device=dev)
    rank = torch.empty(N, dtype=torch.int32, device=dev)
    _hist_rank_kernel[(NB,)](ids, bc, rank, N, E=E, EP=EP, BN=_BN, num_warps=4)
    BE = min(EP, 32)
    niter = triton.next_power_of_2(triton.cdiv(NB, 64))
    _col_scan_kernel[(triton.cdiv(E, BE),)](bc, base, counts, NB, E=E, BE=BE, BB=64,
                                           NITER=niter, num_warps=4)
    BS = 256 if EP <= 64 else 64
    _pos_kernel[(triton.cdiv(N, BS),)](ids, base, rank, counts, order, inv, N, E=E, EP=EP,
                                       BN=_BN, BS=BS, num_warps=4)
    return order, inv, counts


def invert(order_N: torch.Tensor) -> torch.Tensor:
    N = order_N.numel()
    inv = torch.empty(N, dtype=torch.int32, device=order_N.device)
    if N:
        _invert_kernel[(triton.cdiv(N, 1024),)](order_N, inv, N, BS=1024, num_warps=4)
    return inv


def scatter_rows(x_TD: torch.Tensor, inv_N: torch.Tensor, K: int) -> torch.Tensor:
    T, D = x_TD.shape
    out = torch.empty(T * K, D, dtype=x_TD.dtype, device=x_TD.device)
    if T and D:
        bd = _bd(D)
        _scatter_rows_kernel[(T, triton.cdiv(D, bd))](x_TD.contiguous(), inv_N, out, D, K=K,
                                                       BD=bd, num_warps=_warps(bd))
    return out


def gather_sum(y_ND: torch.Tensor, inv_N: torch.Tensor, w_TK: torch.Tensor | None, T: int,
               K: int, out_dtype=None) -> torch.Tensor:
    D = y_ND.shape[1]
    out = torch.empty(T, D, dtype=out_dtype or y_ND.dtype, device=y_ND.device)
    if T and D:
        bd = _bd(D)
        wt = w_TK.contiguous() if w_TK is not None else inv_N
        _gather_sum_kernel[(T, triton.cdiv(D, bd))](y_ND.contiguous(), inv_N, wt, out, D, K=K,
                                                     BD=bd, HAS_W=w_TK is not None,
                                                     num_warps=_warps(bd))
    return out


def combine_bwd(dout_TD, y_ND, inv_N, w_TK):
    T, K = w_TK.shape
    D = y_ND.shape[1]
    dy = torch.empty_like(y_ND)
    dw = torch.empty(T, K, dtype=w_TK.dtype, device=w_TK.device)
    if T and D:
        bd = _bd(D)
        _combine_bwd_kernel[(T,)](dout_TD.contiguous(), y_ND.contiguous(), inv_N,
                                  w_TK.contiguous(), dy, dw, D=D, K=K,
                                  KP=triton.next_power_of_2(K), BD=bd, num_warps=_warps(bd))
    elif T:
        dw.zero_()
    return dy, dw
