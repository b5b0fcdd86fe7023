"""One-kernel router projection + selection (``route(..., fused=True)``).

Shape legend: see ``kernels/__init__.py``. One program per ``BT`` tokens streams its x rows
once through TMA (tensor descriptors: out-of-range rows and columns arrive as zeros, so the
k-loop has no masks). Each k-step does two ``tl.dot`` into fp32 accumulators: the expert
logits ``[BT, EW]`` and (two_level) the domain logits ``[BT, GW]``; bf16 operands on the GPU
lower to wgmma. The logits are rounded to x's dtype and stored, the program synchronizes, and
the selection runs on sub-blocks of ``BS`` tokens re-read from the (L2-hot) logits with the gate
kernel's row code (``triton_gate._gate_rows``), so ids equal ``reference.gate`` on the returned
logits exactly.

This is the fourth version of the one-kernel route (docs/kernels_notes.md has all four); on
the H100 it is still slower than cuBLAS + the gate kernel at E = 256, which is why
``route`` defaults to that pair on CUDA. Its cost is set by moving w: every program reads all
of w from L2 (the fp32 accumulators cap a program at 128 tokens).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.routing.reference import GateSpec
from kernels.routing.triton_gate import _gate_block_t, _gate_rows, _meta, check_inputs

_LAST: dict = {}  # the last compiled launch (benchmarks inspect its PTX for wgmma)


@triton.jit
def _route_tile(
    t0, x_desc, we_desc, wg_desc, bias_ptr, forced_ptr, logits_ptr, w_out_ptr, id_out_ptr, T,
    D: tl.constexpr, G: tl.constexpr, C: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    KP: tl.constexpr, GW: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr, KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr, FORCED: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BS: tl.constexpr, EW: tl.constexpr, WOFF: tl.constexpr, IEEE: tl.constexpr,
    SELECT: tl.constexpr,
):
    """Project, store and select the ``BT`` tokens starting at ``t0``. w's expert columns
    start at column ``WOFF`` of its descriptor, the domain columns at 0."""
    R: tl.constexpr = G * C + G if KIND == 2 else G * C
    OFF: tl.constexpr = G if KIND == 2 else 0
    je = tl.arange(0, EW)
    gw = tl.arange(0, GW)
    acc_e = tl.zeros([BT, EW], dtype=tl.float32)
    acc_g = tl.zeros([BT, GW], dtype=tl.float32)
    for k0 in range(0, D, BK):
        xt = x_desc.load([t0, k0])
        we = we_desc.load([k0, WOFF])
        if IEEE:  # fp32 operands (and the CPU interpreter, whose bf16 dot is wrong): exact fp32
            acc_e = tl.dot(xt.to(tl.float32), we.to(tl.float32), acc_e, input_precision="ieee")
        else:
            acc_e = tl.dot(xt, we, acc_e)
        if KIND == 2:
            wg = wg_desc.load([k0, 0])
            if IEEE:
                acc_g = tl.dot(xt.to(tl.float32), wg.to(tl.float32), acc_g,
                               input_precision="ieee")
            else:
                acc_g = tl.dot(xt, wg, acc_g)
    offs_t = t0 + tl.arange(0, BT)
    mask_t = offs_t < T
    lrow = logits_ptr + offs_t.to(tl.int64)[:, None] * R
    out_ty = logits_ptr.dtype.element_ty
    if KIND == 2:
        tl.store(lrow + gw[None, :], acc_g.to(out_ty), mask=mask_t[:, None] & (gw[None, :] < G))
    tl.store(lrow + OFF + je[None, :], acc_e.to(out_ty),
             mask=mask_t[:, None] & (je[None, :] < G * C))
    tl.debug_barrier()
    if SELECT:  # False: projection only (benchmarks time the two phases apart)
        for sb in range(BT // BS):
            offs_s = t0 + sb * BS + tl.arange(0, BS)
            _gate_rows(logits_ptr, bias_ptr, forced_ptr, w_out_ptr, id_out_ptr, offs_s,
                       offs_s < T, G, C, K1, K2, KP, GW, GP, CP, KIND, HAS_BIAS, FORCED, BS)


@triton.jit
def _route_kernel(
    x_desc, we_desc, wg_desc, bias_ptr, forced_ptr, logits_ptr, w_out_ptr, id_out_ptr, T,
    D: tl.constexpr, G: tl.constexpr, C: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    KP: tl.constexpr, GW: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr, KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr, FORCED: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BS: tl.constexpr, EW: tl.constexpr, WOFF: tl.constexpr, IEEE: tl.constexpr,
    SELECT: tl.constexpr, N_PROGS: tl.constexpr,
):
    if N_PROGS == 0:  # one program per token tile
        _route_tile(tl.program_id(0) * BT, x_desc, we_desc, wg_desc, bias_ptr, forced_ptr,
                    logits_ptr, w_out_ptr, id_out_ptr, T, D, G, C, K1, K2, KP, GW, GP, CP,
                    KIND, HAS_BIAS, FORCED, BT, BK, BS, EW, WOFF, IEEE, SELECT)
    else:  # persistent: N_PROGS programs walk the tiles (not under the interpreter)
        for tile in range(tl.program_id(0), tl.cdiv(T, BT), N_PROGS):
            _route_tile(tile * BT, x_desc, we_desc, wg_desc, bias_ptr, forced_ptr, logits_ptr,
                        w_out_ptr, id_out_ptr, T, D, G, C, K1, K2, KP, GW, GP, CP, KIND,
                        HAS_BIAS, FORCED, BT, BK, BS, EW, WOFF, IEEE, SELECT)
            tl.debug_barrier()  # the next tile must not overwrite rows still being read


def fused_route_supported(x_TD, spec: GateSpec) -> bool:
    """Whether ``fused_route_fwd`` takes these inputs: TMA needs x's rows 16-byte aligned (w
    is padded in the launcher) and at most 256 columns per tile (E ≤ 256); on a GPU, compute
    capability ≥ 9 (Hopper)."""
    import kernels

    if spec.n_experts > 256 or x_TD.dim() != 2 or (x_TD.shape[1] * x_TD.element_size()) % 16:
        return False
    if x_TD.is_cuda:
        return torch.cuda.get_device_capability(x_TD.device)[0] >= 9
    return kernels.interpreting()


def _outputs(x_TD, w_DR, spec: GateSpec, bias_R, forced_groups_TK1):
    """Checks and output buffers: ``(logits_TR, w_TK, ids_TK)``."""
    T, D = x_TD.shape
    R = w_DR.shape[1]
    if w_DR.shape[0] != D:
        raise ValueError(f"w_DR has {w_DR.shape[0]} rows, x_TD has D={D}")
    check_inputs(spec, R, bias_R, forced_groups_TK1, T)
    dev, dt = x_TD.device, x_TD.dtype
    return (torch.empty(T, R, dtype=dt, device=dev),
            torch.empty(T, spec.top_k, dtype=dt, device=dev),
            torch.empty(T, spec.top_k, dtype=torch.int64, device=dev))


def _aligned_w(w_DR, spec: GateSpec, dtype):
    """w in x's dtype laid out for TMA: ``(w, woff)``. Tile starts and row strides must be
    16-byte aligned, so when the expert columns (after G domain columns) or the rows are not,
    a copy gets zero columns: the experts start at ``woff``; the zeros are never stored."""
    w_DR = w_DR.to(dtype).contiguous()
    align = 16 // w_DR.element_size()
    off = spec.n_groups if spec.kind == "two_level" else 0
    woff = -(-off // align) * align
    if woff == off and w_DR.shape[1] % align == 0:
        return w_DR, woff
    E = spec.n_experts
    wpad = w_DR.new_zeros(w_DR.shape[0], woff + E + (-E % align))
    wpad[:, :off] = w_DR[:, :off]
    wpad[:, woff:woff + E] = w_DR[:, off:]
    return wpad, woff


def fused_route_fwd(x_TD, w_DR, spec: GateSpec, bias_R=None, forced_groups_TK1=None,
                    block_t=None, block_k=None, num_warps=None, num_stages=None, block_s=None,
                    persistent=False, select=True):
    """Launch the fused projection + gate kernel: ``(weights_TK, ids_TK, logits_TR)``.

    Default launch (H100 sweeps, ``benchmarks/bench_route_fused.py``): 128 tokens × 8 warps
    (two warpgroups), BK 64, 4 stages in bf16; fp32 operands take BK 32 and 2 stages (shared
    memory). ``persistent``: one program per SM walking the token tiles. ``select=False``
    skips the selection (weights and ids left unwritten), for timing the projection alone.
    Needs ``fused_route_supported(x_TD, spec)``.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not fused_route_supported(x_TD, spec):
        raise ValueError("fused_route_fwd needs fused_route_supported(x_TD, spec): Hopper or "
                         "the interpreter, x rows a multiple of 16 bytes, E <= 256")
    T, D = x_TD.shape
    dt = x_TD.dtype
    logits_TR, w_TK, ids_TK = _outputs(x_TD, w_DR, spec, bias_R, forced_groups_TK1)
    if T == 0:
        return w_TK, ids_TK, logits_TR
    if x_TD.stride(1) != 1 or x_TD.data_ptr() % 16:
        x_TD = x_TD.contiguous() if x_TD.stride(1) != 1 else x_TD.clone()
    w_DR, woff = _aligned_w(w_DR, spec, dt)
    m = _meta(spec)
    wide = dt == torch.float32
    nw = num_warps or 8
    bt = block_t or 128
    bk = block_k or (32 if wide else 64)
    bs = min(bt, block_s or nw * _gate_block_t(spec))
    for name, v in (("block_t", bt), ("block_k", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {v}")
    ew = max(16, triton.next_power_of_2(spec.n_experts))  # tl.dot needs N >= 16
    x_desc = TensorDescriptor.from_tensor(x_TD, [bt, bk])
    we_desc = TensorDescriptor.from_tensor(w_DR, [bk, ew])
    wg_desc = TensorDescriptor.from_tensor(w_DR, [bk, m["GW"]])
    tiles = triton.cdiv(T, bt)
    progs = 0  # 0: one program per tile (the interpreter cannot run the persistent loop)
    if persistent and x_TD.is_cuda:
        progs = min(tiles, torch.cuda.get_device_properties(x_TD.device).multi_processor_count)
    bias = bias_R.contiguous() if bias_R is not None else logits_TR
    forced = forced_groups_TK1.contiguous() if forced_groups_TK1 is not None else ids_TK
    _LAST["kernel"] = _route_kernel[(progs or tiles,)](
        x_desc, we_desc, wg_desc, bias, forced, logits_TR, w_TK, ids_TK, T, D=D, **m,
        HAS_BIAS=bias_R is not None, FORCED=forced_groups_TK1 is not None, BT=bt, BK=bk, BS=bs,
        EW=ew, WOFF=woff, IEEE=wide or not x_TD.is_cuda, SELECT=bool(select), N_PROGS=progs,
        num_warps=nw, num_stages=num_stages or (2 if wide else 4),
    )
    return w_TK, ids_TK, logits_TR
