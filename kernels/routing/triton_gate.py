"""Triton gating: router projection + two-level softmax/top-k + renormalize, forward and backward.

Shape legend (see ``kernels/__init__.py``): T tokens, D model dim, G domains (groups),
C components per domain, E = G·C experts, R router outputs (G + E for two_level, E otherwise),
K = k1·k2 picks per token, K1 = k1. In-kernel padded sizes: GW = group-logit width
(power of two ≥ 16, ≥ G), GP/CP = G and C rounded up to powers of two, BT tokens per program.

One kernel family covers the three ``GateSpec`` kinds. ``two_level`` reads the G domain logits,
picks k1 domains, then reads only the chosen domains' C component logits (softmax and top-k2
per row). ``flat`` / ``group_limited`` hold a block's expert logits as a ``[BT, GP, CP]`` tile
(padded column ↔ expert g·C + c), so group scores (top-2 sums) are reductions over the last
axis and the group limit is a mask. Every pick is the same step: max, lowest index among equal
scores, mask it, repeated k times, which reproduces the reference's stable descending sort
exactly (tie rule: lower index wins; picks best first). Selection scores are fp32
probabilities (+ bias, selection only) of logits rounded to the logits' dtype, as in the
reference. Balancing counts come from ``triton_permute.expert_counts`` / ``permute`` (no host
sync).

Layers: ``_gate_fwd_kernel`` / ``_gate_bwd_kernel`` (@triton.jit; the fused route kernel is in
``triton_route``) and their launchers ``gate_fwd`` / ``gate_bwd`` here; the custom ops with
autograd (``mhc::gate``, ``mhc::route``; the route's backward also takes the gradient of
``logits_TR`` for the aux and z losses) and the public ``gate`` / ``route`` in ``triton_ops``.

``route`` on CUDA defaults to the projection through cuBLAS + the gate kernel (two launches);
``route(..., fused=True)`` (or ``MHC_ROUTE_FUSED=1``) uses the one-kernel projection + selection
of ``triton_route.fused_route_fwd`` where it applies (Hopper or the interpreter, x rows
16-byte aligned, E ≤ 256). On the H100 the pair measured faster at E=256 (26.9 vs 30.1 µs at
T=16384, d=1024) and equal within 2 % at E=64 (docs/benchmarks.md, docs/kernels_notes.md).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.routing.reference import GateSpec

_KIND_ID = {"flat": 0, "group_limited": 1, "two_level": 2}
FUSED_DEFAULT = os.environ.get("MHC_ROUTE_FUSED", "0") == "1"
_BIG = 1 << 30


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _softmax_last(x, AXIS: tl.constexpr):
    """Softmax along ``AXIS`` (the last axis) of a -inf padded tile; an all -inf row gives 0."""
    m = tl.max(x, axis=AXIS, keep_dims=True)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(x - m)
    s = tl.sum(e, axis=AXIS, keep_dims=True)
    return e / tl.where(s == 0.0, 1.0, s)


@triton.jit
def _softmax_gc(x):
    """Softmax over both trailing axes of a -inf padded ``[BT, GP, CP]`` tile."""
    m = tl.max(tl.max(x, axis=2), axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(x - m[:, None, None])
    s = tl.sum(tl.sum(e, axis=2), axis=1)
    return e / tl.where(s == 0.0, 1.0, s)[:, None, None]


@triton.jit
def _select(
    lg,  # [BT, GW] unused here (two_level goes through _select_two_level)
    le,  # [BT, GP, CP] fp32 expert logits, -inf padded
    bias_ptr,
    forced_ptr,
    offs_t,
    mask_t,
    G: tl.constexpr,
    C: tl.constexpr,
    K1: tl.constexpr,
    K2: tl.constexpr,
    KP: tl.constexpr,
    GW: tl.constexpr,
    GP: tl.constexpr,
    CP: tl.constexpr,
    KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FORCED: tl.constexpr,
):
    """flat / group_limited selection from a ``[BT, GP, CP]`` logits tile: returns
    (weights [BT, KP] fp32 renormalized, ids [BT, KP] int32)."""
    BIG: tl.constexpr = 1 << 30
    g3 = tl.arange(0, GP)[None, :, None]
    c3 = tl.arange(0, CP)[None, None, :]
    valid3 = (g3 < G) & (c3 < C)
    kk = tl.arange(0, KP)[None, :]
    w_acc = tl.zeros([lg.shape[0], KP], dtype=tl.float32)
    id_acc = tl.zeros([lg.shape[0], KP], dtype=tl.int32)
    e3 = tl.where(valid3, g3 * C + c3, BIG)
    p = _softmax_gc(le)
    sel = p
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + g3 * C + c3, mask=valid3, other=0.0).to(tl.float32)
    sel = tl.where(valid3, sel, float("-inf"))
    if KIND == 1:
        # DeepSeek-V3 group score: sum of the group's top-2 selection scores
        m1 = tl.max(sel, axis=2)  # [BT, GP]
        score = m1
        if C >= 2:
            i1 = tl.min(tl.where(sel == m1[:, :, None], c3, BIG), axis=2)
            m2 = tl.max(tl.where(c3 == i1[:, :, None], float("-inf"), sel), axis=2)
            score = m1 + m2
        gp2 = tl.arange(0, GP)[None, :]
        score = tl.where(gp2 < G, score, float("-inf"))
        keep = gp2 < 0
        for _i in tl.static_range(K1):
            m = tl.max(score, axis=1)
            gi = tl.min(tl.where(score == m[:, None], gp2, BIG), axis=1)
            keep = keep | (gp2 == gi[:, None])
            score = tl.where(gp2 == gi[:, None], float("-inf"), score)
        sel = tl.where(keep[:, :, None], sel, float("-inf"))
    for j in tl.static_range(K1 * K2):
        m = tl.max(tl.max(sel, axis=2), axis=1)
        ei = tl.min(tl.min(tl.where(sel == m[:, None, None], e3, BIG), axis=2), axis=1)
        hit = e3 == ei[:, None, None]
        pe = tl.sum(tl.sum(tl.where(hit, p, 0.0), axis=2), axis=1)
        sel = tl.where(hit, float("-inf"), sel)
        w_acc = tl.where(kk == j, pe[:, None], w_acc)
        id_acc = tl.where(kk == j, ei[:, None], id_acc)
    s = tl.sum(w_acc, axis=1)
    w_acc = w_acc / tl.maximum(s, 1e-20)[:, None]
    return w_acc, id_acc


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _select_two_level(
    row, lg, bias_ptr, forced_ptr, offs_t, mask_t,
    G: tl.constexpr, C: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, KP: tl.constexpr,
    GW: tl.constexpr, CP: tl.constexpr, HAS_BIAS: tl.constexpr, FORCED: tl.constexpr,
):
    """two_level selection that reads only what it needs: the G domain logits, then, for each
    chosen domain, that domain's C component logits (a 2·C-byte row per token and pick) — the
    other domains' components are never loaded or exponentiated."""
    BIG: tl.constexpr = 1 << 30
    gw = tl.arange(0, GW)[None, :]
    c2 = tl.arange(0, CP)[None, :]
    cmask = c2 < C
    kk = tl.arange(0, KP)[None, :]
    w_acc = tl.zeros([lg.shape[0], KP], dtype=tl.float32)
    id_acc = tl.zeros([lg.shape[0], KP], dtype=tl.int32)
    pg = _softmax_last(lg, 1)
    selg = pg
    if HAS_BIAS:
        selg = selg + tl.load(bias_ptr + gw, mask=gw < G, other=0.0).to(tl.float32)
    selg = tl.where(gw < G, selg, float("-inf"))
    for i in tl.static_range(K1):
        if FORCED:
            gi = tl.load(forced_ptr + offs_t * K1 + i, mask=mask_t, other=0).to(tl.int32)
        else:
            m = tl.max(selg, axis=1)
            gi = tl.min(tl.where(selg == m[:, None], gw, BIG), axis=1)
            # NaN logits match nothing (gi = BIG): clamp so the component-row load below
            # stays inside the token's row (unclamped it read from a wild address).
            gi = tl.minimum(gi, G - 1)
            selg = tl.where(gw == gi[:, None], float("-inf"), selg)
        pgi = tl.sum(tl.where(gw == gi[:, None], pg, 0.0), axis=1)
        col = G + gi[:, None] * C + c2
        lrow = tl.load(row[:, None] + col, mask=mask_t[:, None] & cmask, other=float("-inf"))
        rp = _softmax_last(lrow.to(tl.float32), 1)  # p(component | domain gi)
        rsel = rp
        if HAS_BIAS:
            rsel = rsel + tl.load(bias_ptr + col, mask=mask_t[:, None] & cmask,
                                  other=0.0).to(tl.float32)
        rsel = tl.where(cmask, rsel, float("-inf"))
        sc = tl.zeros([lg.shape[0]], dtype=tl.float32)  # Σ p(c|g) over this domain's picks
        for j in tl.static_range(K2):
            m2 = tl.max(rsel, axis=1)
            ci = tl.minimum(tl.min(tl.where(rsel == m2[:, None], c2, BIG), axis=1), C - 1)
            pci = tl.sum(tl.where(c2 == ci[:, None], rp, 0.0), axis=1)
            rsel = tl.where(c2 == ci[:, None], float("-inf"), rsel)
            sc += pci
            w_acc = tl.where(kk == i * K2 + j, pci[:, None], w_acc)
            id_acc = tl.where(kk == i * K2 + j, (gi * C + ci)[:, None], id_acc)
        # renormalize within level 2 only, scaled by p(g) (reference.py: why)
        mine = (kk >= i * K2) & (kk < i * K2 + K2)
        w_acc = tl.where(mine, w_acc * (pgi / tl.maximum(sc, 1e-20))[:, None], w_acc)
    return w_acc, id_acc


@triton.jit
def _gate_rows(
    logits_ptr, bias_ptr, forced_ptr, w_out_ptr, id_out_ptr, offs_t, mask_t,
    G: tl.constexpr, C: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, KP: tl.constexpr,
    GW: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr, KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr, FORCED: tl.constexpr, BT: tl.constexpr,
):
    """Load the logits of tokens ``offs_t``, select, store weights and ids."""
    R: tl.constexpr = G * C + G if KIND == 2 else G * C
    OFF: tl.constexpr = G if KIND == 2 else 0
    K: tl.constexpr = K1 * K2
    row = logits_ptr + offs_t.to(tl.int64) * R
    gw = tl.arange(0, GW)[None, :]
    lg = tl.full([BT, GW], float("-inf"), tl.float32)
    if KIND == 2:
        lg = tl.load(row[:, None] + gw, mask=mask_t[:, None] & (gw < G), other=float("-inf"))
        lg = lg.to(tl.float32)
    if KIND == 2:
        w, ids = _select_two_level(row, lg, bias_ptr, forced_ptr, offs_t, mask_t,
                                   G, C, K1, K2, KP, GW, CP, HAS_BIAS, FORCED)
    else:
        g3 = tl.arange(0, GP)[None, :, None]
        c3 = tl.arange(0, CP)[None, None, :]
        m3 = mask_t[:, None, None] & (g3 < G) & (c3 < C)
        le = tl.load(row[:, None, None] + OFF + g3 * C + c3, mask=m3, other=float("-inf"))
        w, ids = _select(lg, le.to(tl.float32), bias_ptr, forced_ptr, offs_t, mask_t,
                         G, C, K1, K2, KP, GW, GP, CP, KIND, HAS_BIAS, FORCED)
    kk = tl.arange(0, KP)[None, :]
    om = mask_t[:, None] & (kk < K)
    optr = offs_t.to(tl.int64)[:, None] * K + kk
    tl.store(w_out_ptr + optr, w.to(w_out_ptr.dtype.element_ty), mask=om)
    tl.store(id_out_ptr + optr, ids.to(tl.int64), mask=om)


@triton.jit
def _gate_fwd_kernel(
    logits_ptr, bias_ptr, forced_ptr, w_out_ptr, id_out_ptr, T,
    G: tl.constexpr, C: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, KP: tl.constexpr,
    GW: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr, KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr, FORCED: tl.constexpr, BT: tl.constexpr,
):
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    _gate_rows(logits_ptr, bias_ptr, forced_ptr, w_out_ptr, id_out_ptr, offs_t, offs_t < T,
               G, C, K1, K2, KP, GW, GP, CP, KIND, HAS_BIAS, FORCED, BT)


@triton.jit
def _gate_bwd_kernel(
    logits_ptr, ids_ptr, dw_ptr, dlext_ptr, dl_ptr, T,
    G: tl.constexpr, C: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    GW: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr, KIND: tl.constexpr,
    HAS_EXT: tl.constexpr, BT: tl.constexpr,
):
    """d logits from d weights (through the renormalization and the softmaxes), plus an
    external d logits (aux / z losses). The selection itself is piecewise constant: no
    gradient. two_level picks are laid out as the forward writes them: domain pick i owns
    slots i·K2 .. i·K2 + K2 − 1."""
    R: tl.constexpr = G * C + G if KIND == 2 else G * C
    OFF: tl.constexpr = G if KIND == 2 else 0
    K: tl.constexpr = K1 * K2
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    mask_t = offs_t < T
    t64 = offs_t.to(tl.int64)
    row = logits_ptr + t64 * R
    g3 = tl.arange(0, GP)[None, :, None]
    c3 = tl.arange(0, CP)[None, None, :]
    valid3 = (g3 < G) & (c3 < C)
    m3 = mask_t[:, None, None] & valid3
    le = tl.load(row[:, None, None] + OFF + g3 * C + c3, mask=m3, other=float("-inf"))
    le = le.to(tl.float32)
    gw = tl.arange(0, GW)[None, :]
    mg = mask_t[:, None] & (gw < G)
    e3 = g3 * C + c3
    dpe = tl.zeros([BT, GP, CP], dtype=tl.float32)  # d p(e) (flat) / d p(c|g) (two_level)
    dpg = tl.zeros([BT, GW], dtype=tl.float32)
    if KIND == 2:
        # ŵ_k = p(g) r_k, r_k = p(c_k|g) / S_g over the K2 picks k of domain pick i (S_g their
        # sum):  d p(g) = Σ_k dŵ_k r_k,  d p(c_k|g) = p(g)/S_g · (dŵ_k − d p(g))
        lg = tl.load(row[:, None] + gw, mask=mg, other=float("-inf")).to(tl.float32)
        pg = _softmax_last(lg, 1)
        pc = _softmax_last(le, 2)
        for i in tl.static_range(K1):
            gi = tl.load(ids_ptr + t64 * K + i * K2, mask=mask_t, other=0).to(tl.int32) // C
            pgi = tl.sum(tl.where(gw == gi[:, None], pg, 0.0), axis=1)
            sg = tl.zeros([BT], dtype=tl.float32)
            sdw = tl.zeros([BT], dtype=tl.float32)
            for j in tl.static_range(K2):
                idk = tl.load(ids_ptr + t64 * K + i * K2 + j, mask=mask_t, other=0).to(tl.int32)
                dwk = tl.load(dw_ptr + t64 * K + i * K2 + j, mask=mask_t, other=0.0)
                hit = (e3 == idk[:, None, None]) & valid3
                pck = tl.sum(tl.sum(tl.where(hit, pc, 0.0), axis=2), axis=1)
                sg += pck
                sdw += dwk.to(tl.float32) * pck
            sg = tl.maximum(sg, 1e-20)
            dpgi = sdw / sg
            for j in tl.static_range(K2):
                idk = tl.load(ids_ptr + t64 * K + i * K2 + j, mask=mask_t, other=0).to(tl.int32)
                dwk = tl.load(dw_ptr + t64 * K + i * K2 + j, mask=mask_t, other=0.0)
                hit = (e3 == idk[:, None, None]) & valid3
                dpe += tl.where(hit, ((dwk.to(tl.float32) - dpgi) * pgi / sg)[:, None, None], 0.0)
            dpg += tl.where(gw == gi[:, None], dpgi[:, None], 0.0)
    else:
        # ŵ_k = p_k / S over all K picks:  d p_k = (dŵ_k − Σ_j dŵ_j ŵ_j) / S
        p = _softmax_gc(le)
        s = tl.zeros([BT], dtype=tl.float32)
        sdw = tl.zeros([BT], dtype=tl.float32)
        for k in tl.static_range(K):
            idk = tl.load(ids_ptr + t64 * K + k, mask=mask_t, other=0).to(tl.int32)
            dwk = tl.load(dw_ptr + t64 * K + k, mask=mask_t, other=0.0).to(tl.float32)
            hit = (e3 == idk[:, None, None]) & valid3
            wk = tl.sum(tl.sum(tl.where(hit, p, 0.0), axis=2), axis=1)
            s += wk
            sdw += dwk * wk
        s = tl.maximum(s, 1e-20)
        corr = sdw / s
        for k in tl.static_range(K):
            idk = tl.load(ids_ptr + t64 * K + k, mask=mask_t, other=0).to(tl.int32)
            dwk = tl.load(dw_ptr + t64 * K + k, mask=mask_t, other=0.0).to(tl.float32)
            hit = (e3 == idk[:, None, None]) & valid3
            dpe += tl.where(hit, ((dwk - corr) / s)[:, None, None], 0.0)
    # softmax backward
    if KIND == 2:
        dlg = pg * (dpg - tl.sum(pg * dpg, axis=1)[:, None])
        dle = pc * (dpe - tl.sum(pc * dpe, axis=2)[:, :, None])
    else:
        dle = p * (dpe - tl.sum(tl.sum(p * dpe, axis=2), axis=1)[:, None, None])
    orow = dl_ptr + t64 * R
    erow = dlext_ptr + t64 * R
    eptr = OFF + g3 * C + c3
    if HAS_EXT:
        dle += tl.load(erow[:, None, None] + eptr, mask=m3, other=0.0).to(tl.float32)
    tl.store(orow[:, None, None] + eptr, dle.to(dl_ptr.dtype.element_ty), mask=m3)
    if KIND == 2:
        if HAS_EXT:
            dlg += tl.load(erow[:, None] + gw, mask=mg, other=0.0).to(tl.float32)
        tl.store(orow[:, None] + gw, dlg.to(dl_ptr.dtype.element_ty), mask=mg)


# ----------------------------------------------------------------------------- launchers


def _meta(spec: GateSpec) -> dict:
    return dict(
        G=spec.n_groups, C=spec.n_components, K1=spec.k1, K2=spec.k2, KP=_p2(spec.top_k),
        GW=max(16, _p2(spec.n_groups)), GP=_p2(spec.n_groups), CP=_p2(spec.n_components),
        KIND=_KIND_ID[spec.kind],
    )


def _gate_block_t(spec: GateSpec) -> int:
    """Tokens per program for the selection: ~2048 tile elements per warp. Measured on the
    H100 (T=16384, bf16): one warp per program, 32 tokens at E=64 (3.1 µs) and 8 tokens at
    E=256 (9.9 µs); cross-warp reductions (more warps per token block) cost 3–20×."""
    ew = _p2(spec.n_groups) * _p2(spec.n_components)
    return max(1, min(64, 2048 // ew))


def check_inputs(spec: GateSpec, R: int, bias_R, forced_groups_TK1, T: int):
    """ValueError for logits of the wrong width, forced groups of the wrong shape or
    kind, or a bias of the wrong size."""
    if R != spec.n_router_outputs:
        raise ValueError(f"logits have {R} columns, spec needs {spec.n_router_outputs}")
    if forced_groups_TK1 is not None:
        if spec.kind != "two_level":
            raise ValueError("forced_groups_TK1 needs kind='two_level'")
        if tuple(forced_groups_TK1.shape) != (T, spec.k1):
            raise ValueError(
                f"forced_groups must be {(T, spec.k1)}, got {tuple(forced_groups_TK1.shape)}"
            )
    if bias_R is not None and bias_R.numel() != spec.n_router_outputs:
        raise ValueError(f"bias_R must have {spec.n_router_outputs} entries")


def gate_fwd(logits_TR, spec: GateSpec, bias_R=None, forced_groups_TK1=None, block_t=None,
             num_warps=1):
    """Launch the gate kernel: ``(weights_TK in logits' dtype, ids_TK int64)``."""
    T, R = logits_TR.shape
    check_inputs(spec, R, bias_R, forced_groups_TK1, T)
    K = spec.top_k
    w_TK = torch.empty(T, K, dtype=logits_TR.dtype, device=logits_TR.device)
    ids_TK = torch.empty(T, K, dtype=torch.int64, device=logits_TR.device)
    if T == 0:
        return w_TK, ids_TK
    logits_TR = logits_TR.contiguous()
    bt = block_t or _gate_block_t(spec)
    bias = bias_R.contiguous() if bias_R is not None else logits_TR
    forced = forced_groups_TK1.contiguous() if forced_groups_TK1 is not None else ids_TK
    _gate_fwd_kernel[(triton.cdiv(T, bt),)](
        logits_TR, bias, forced, w_TK, ids_TK, T, **_meta(spec),
        HAS_BIAS=bias_R is not None, FORCED=forced_groups_TK1 is not None, BT=bt,
        num_warps=num_warps,
    )
    return w_TK, ids_TK


def gate_bwd(logits_TR, ids_TK, dweights_TK, spec: GateSpec, dlogits_ext_TR=None,
             out_dtype=None, block_t=None, num_warps=1):
    """d logits_TR (in ``out_dtype``, default fp32) from d weights_TK (+ external d logits)."""
    T, R = logits_TR.shape
    dl = torch.empty(T, R, dtype=out_dtype or torch.float32, device=logits_TR.device)
    if T == 0:
        return dl
    bt = block_t or _gate_block_t(spec)
    m = _meta(spec)
    m.pop("KP")
    ext = dlogits_ext_TR.contiguous() if dlogits_ext_TR is not None else dl
    _gate_bwd_kernel[(triton.cdiv(T, bt),)](
        logits_TR.contiguous(), ids_TK.contiguous(), dweights_TK.contiguous(), ext, dl, T, **m,
        HAS_EXT=dlogits_ext_TR is not None, BT=bt, num_warps=num_warps,
    )
    return dl
