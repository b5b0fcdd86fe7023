"""One-kernel router projection + selection (``route(..., fused=True)``), v3.

Shape legend: see ``kernels/__init__.py``. One program per ``BT`` tokens streams its x rows
once: a k-loop over D with two ``tl.dot`` per step into fp32 accumulators, the expert logits
``[BT, GP·CP]`` and (two_level) the domain logits ``[BT, GW]`` (bf16 operands on the GPU). The
logits are rounded to x's dtype and stored, the program synchronizes, and the selection runs on
sub-blocks of ``BS`` tokens re-read from the (L2-hot) logits with the gate kernel's row code
(``triton_gate._gate_rows``), so ids equal ``reference.gate`` on the returned logits exactly.

Differences from ``triton_gate._route_fwd_kernel`` (v2): w's row stride is the compile-time
``R`` (w is made contiguous), so Triton knows every w row starts on a 16-byte boundary and
can copy w tiles with 16-byte asynchronous copies; the domain and expert products share one
k-loop (x read from L2 once, not twice); the k mask is dropped when ``BK`` divides ``D``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.routing.reference import GateSpec
from kernels.routing.triton_gate import _gate_block_t, _gate_rows, _meta, _route_prologue

_LAST: dict = {}  # the last compiled launch (benchmarks inspect its PTX for wgmma)


@triton.jit
def _route_v3_kernel(
    x_ptr, wr_ptr, bias_ptr, forced_ptr, logits_ptr, w_out_ptr, id_out_ptr, T,
    stride_xt, D: tl.constexpr,
    G: tl.constexpr, C: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, KP: tl.constexpr,
    GW: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr, KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr, FORCED: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BS: tl.constexpr, IEEE: tl.constexpr, DENSE: tl.constexpr, SPLIT_LOOPS: tl.constexpr,
    SELECT: tl.constexpr,
):
    R: tl.constexpr = G * C + G if KIND == 2 else G * C
    OFF: tl.constexpr = G if KIND == 2 else 0
    EW: tl.constexpr = GP * CP
    EVEN_K: tl.constexpr = D % BK == 0
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    offs_k = tl.arange(0, BK)
    je = tl.arange(0, EW)
    gw = tl.arange(0, GW)
    if DENSE:
        col_e = OFF + je
        valid_e = je < EW
    else:
        col_e = OFF + (je // CP) * C + (je % CP)
        valid_e = ((je // CP) < G) & ((je % CP) < C)
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    lrow = logits_ptr + offs_t.to(tl.int64)[:, None] * R
    out_ty = logits_ptr.dtype.element_ty
    acc_e = tl.zeros([BT, EW], dtype=tl.float32)
    acc_g = tl.zeros([BT, GW], dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + offs_k
        if EVEN_K:
            kmask = offs_k < BK
        else:
            kmask = kk < D
        xt = tl.load(x_rows + kk[None, :], mask=mask_t[:, None] & kmask[None, :], other=0.0)
        w_rows = wr_ptr + kk[:, None] * R  # R constexpr: row starts are 2·R-byte aligned
        we = tl.load(w_rows + col_e[None, :], mask=kmask[:, None] & valid_e[None, :], other=0.0)
        if IEEE:
            acc_e = tl.dot(xt.to(tl.float32), we.to(tl.float32), acc_e, input_precision="ieee")
        else:
            acc_e = tl.dot(xt, we, acc_e)
        if KIND == 2:
            if not SPLIT_LOOPS:
                wg = tl.load(w_rows + gw[None, :], mask=kmask[:, None] & (gw[None, :] < G),
                             other=0.0)
                if IEEE:
                    acc_g = tl.dot(xt.to(tl.float32), wg.to(tl.float32), acc_g,
                                   input_precision="ieee")
                else:
                    acc_g = tl.dot(xt, wg, acc_g)
    if KIND == 2:
        if SPLIT_LOOPS:
            for k0 in range(0, D, BK):
                kk = k0 + offs_k
                if EVEN_K:
                    kmask = offs_k < BK
                else:
                    kmask = kk < D
                xt = tl.load(x_rows + kk[None, :], mask=mask_t[:, None] & kmask[None, :],
                             other=0.0)
                wg = tl.load(wr_ptr + kk[:, None] * R + gw[None, :],
                             mask=kmask[:, None] & (gw[None, :] < G), other=0.0)
                if IEEE:
                    acc_g = tl.dot(xt.to(tl.float32), wg.to(tl.float32), acc_g,
                                   input_precision="ieee")
                else:
                    acc_g = tl.dot(xt, wg, acc_g)
        tl.store(lrow + gw[None, :], acc_g.to(out_ty), mask=mask_t[:, None] & (gw[None, :] < G))
    tl.store(lrow + col_e[None, :], acc_e.to(out_ty), mask=mask_t[:, None] & valid_e[None, :])
    tl.debug_barrier()
    if SELECT:  # False: projection only (benchmarks measure the two phases apart)
        for sb in range(BT // BS):
            offs_s = tl.program_id(0) * BT + sb * BS + tl.arange(0, BS)
            _gate_rows(logits_ptr, bias_ptr, forced_ptr, w_out_ptr, id_out_ptr, offs_s,
                       offs_s < T, G, C, K1, K2, KP, GW, GP, CP, KIND, HAS_BIAS, FORCED, BS)


def route_fwd_v3(x_TD, w_DR, spec: GateSpec, bias_R=None, forced_groups_TK1=None, block_t=None,
                 block_k=None, num_warps=None, num_stages=None, block_s=None,
                 split_loops=False, select=True):
    """Launch the v3 fused projection + gate kernel: ``(weights_TK, ids_TK, logits_TR)``.

    Default launch (H100 sweep, ``benchmarks/bench_route_fused.py``): 128 tokens × 8 warps
    (two warpgroups: Triton 3.6 lowers both dots to wgmma), BK 64, 4 stages in bf16; fp32
    operands take BK 32 and 2 stages (shared memory). ``select=False`` skips the selection
    (weights and ids left unwritten): for timing the projection phase alone.
    """
    T, D = x_TD.shape
    dt = x_TD.dtype
    x_TD, w_DR, logits_TR, w_TK, ids_TK = _route_prologue(
        x_TD, w_DR, spec, bias_R, forced_groups_TK1, contiguous_w=True)
    if T == 0:
        return w_TK, ids_TK, logits_TR
    m = _meta(spec)
    wide = dt == torch.float32
    nw = num_warps or 8
    bt = block_t or 128
    bk = block_k or (32 if wide else 64)
    bs = min(bt, block_s or nw * _gate_block_t(spec))
    bias = bias_R.contiguous() if bias_R is not None else logits_TR
    forced = forced_groups_TK1.contiguous() if forced_groups_TK1 is not None else ids_TK
    _LAST["kernel"] = _route_v3_kernel[(triton.cdiv(T, bt),)](
        x_TD, w_DR, bias, forced, logits_TR, w_TK, ids_TK, T, x_TD.stride(0), D=D, **m,
        HAS_BIAS=bias_R is not None, FORCED=forced_groups_TK1 is not None, BT=bt, BK=bk, BS=bs,
        IEEE=dt == torch.float32 or not x_TD.is_cuda,
        DENSE=m["GP"] == spec.n_groups and m["CP"] == spec.n_components,
        SPLIT_LOOPS=bool(split_loops), SELECT=bool(select), num_warps=nw,
        num_stages=num_stages or (2 if wide else 4),
    )
    return w_TK, ids_TK, logits_TR
