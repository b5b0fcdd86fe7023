"""Triton gating (fused projection + two-level softmax/top-k) against the torch reference.

Ids must match exactly (tie rule: lower index wins, picks best first); weights within the
per-dtype tolerance table; gradients through weights and logits against reference autograd.
"""

from __future__ import annotations

import pytest
import torch
from _routing_utils import DEVICE, DTYPES, GRAD_TOL, TOL, assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels.routing import reference as ref
from kernels.routing import triton_ops as tg
from kernels.routing.reference import GateSpec

SPECS = [
    GateSpec("two_level", 8, 8, 1, 2),
    GateSpec("two_level", 3, 5, 2, 3),  # non-power-of-two G, C (E = 15, R = 18)
    GateSpec("flat", 8, 8, 1, 6),
    GateSpec("flat", 1, 7, 1, 3),  # E = 7
    GateSpec("group_limited", 8, 8, 2, 3),
    GateSpec("group_limited", 3, 5, 2, 2),
]


def _ids(spec):
    return f"{spec.kind}-G{spec.n_groups}C{spec.n_components}-k{spec.k1}x{spec.k2}"


def _logits(T, spec, dtype, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, spec.n_router_outputs, generator=g) * scale).to(dtype).to(DEVICE)


def _check_gate(logits, spec, bias=None, forced=None):
    w, ids = tg.gate(logits, spec, bias, forced)
    wr, idr = ref.gate(logits, spec, bias, forced)
    assert ids.dtype == torch.int64 and w.dtype == logits.dtype
    assert torch.equal(ids, idr), (ids, idr)
    assert_close(w, wr)
    return w, ids


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [0, 1, 7, 33])
def test_gate_matches_reference(spec, dtype, T):
    _check_gate(_logits(T, spec, dtype, seed=T), spec)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_gate_bias_selects_but_does_not_weigh(spec):
    logits = _logits(19, spec, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    bias = (torch.randn(spec.n_router_outputs, generator=g) * 0.2).to(DEVICE)
    _check_gate(logits, spec, bias)


def test_gate_forced_groups():
    spec = GateSpec("two_level", 5, 6, 2, 3)
    logits = _logits(11, spec, torch.float32, seed=5)
    forced = torch.stack([torch.randperm(5)[:2] for _ in range(11)]).to(DEVICE)
    w, ids = _check_gate(logits, spec, forced=forced)
    assert torch.equal(ids[:, ::3] // 6, forced)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate_exact_ties(spec, dtype):
    """Logits drawn from {-1, 0, 1}: many exact ties, resolved by lower index first."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randint(-1, 2, (29, spec.n_router_outputs), generator=g).to(dtype).to(DEVICE)
    logits[0] = 0.0  # a fully tied row
    _check_gate(logits, spec)
    w, ids = tg.gate(logits[:1], spec)
    if spec.kind != "two_level":  # all equal: the lowest ids win, in order
        assert ids[0].tolist() == list(range(spec.top_k))


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_gate_grad(spec):
    T = 13
    logits = _logits(T, spec, torch.float32, seed=9)
    g = torch.Generator().manual_seed(10)
    dw = torch.randn(T, spec.top_k, generator=g).to(DEVICE)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    (tg.gate(a, spec)[0] * dw).sum().backward()
    (ref.gate(b, spec)[0] * dw).sum().backward()
    assert_close(a.grad, b.grad, table=GRAD_TOL)


@pytest.mark.parametrize("spec", [GateSpec("two_level", 5, 6, 2, 3),
                                  GateSpec("two_level", 4, 3, 1, 2)], ids=_ids)
def test_gate_grad_forced_and_bias(spec):
    """two_level backward with forced domains (not the top ones) and a selection bias: the
    kernel groups a token's picks by domain slot, as the forward lays them out."""
    T = 17
    logits = _logits(T, spec, torch.float32, seed=14)
    g = torch.Generator().manual_seed(15)
    bias = (torch.randn(spec.n_router_outputs, generator=g) * 0.2).to(DEVICE)
    forced = torch.stack([torch.randperm(spec.n_groups, generator=g)[: spec.k1]
                          for _ in range(T)]).to(DEVICE)
    dw = torch.randn(T, spec.top_k, generator=g).to(DEVICE)
    grads = []
    for impl in (tg, ref):
        a = logits.clone().requires_grad_()
        w, ids = impl.gate(a, spec, bias, forced)
        (w * dw).sum().backward()
        grads.append((a.grad, ids))
    assert torch.equal(grads[0][1], grads[1][1])
    assert_close(grads[0][0], grads[1][0], table=GRAD_TOL)


def _route_inputs(T, D, spec, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(dtype).to(DEVICE)
    w = (torch.randn(D, spec.n_router_outputs, generator=g) * D**-0.5).to(dtype).to(DEVICE)
    return x, w


@pytest.mark.parametrize("spec", SPECS[:1] + SPECS[1::2], ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,D", [(0, 16), (1, 40), (7, 33), (37, 64)])
def test_route_matches_reference(spec, dtype, T, D):
    x, w = _route_inputs(T, D, spec, dtype, seed=T + D)
    wt, it, lt = tg.route(x, w, spec)
    wr, ir, lr = ref.route(x, w, spec)
    assert lt.dtype == lr.dtype and lt.shape == lr.shape
    assert_close(lt, lr)
    # selection given the logits is exact; the logits themselves carry matmul rounding
    wg, ig = ref.gate(lt, spec)
    assert torch.equal(it, ig)
    assert_close(wt, wg)
    same = (it == ir).all(1)
    assert T == 0 or same.float().mean() >= (0.7 if dtype != torch.float32 else 0.9)
    assert_close(wt[same], wr[same])


@pytest.mark.parametrize("spec", SPECS[:1] + SPECS[1::2], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_route_grad_weights_and_logits(spec, dtype):
    """Gradients to x and w through the selected weights and through logits (z-loss)."""
    T, D = 21, 24
    g = torch.Generator().manual_seed(12)
    # small integers / 8: every logit is exact in bf16, so both paths select the same experts
    x = torch.randint(-2, 3, (T, D), generator=g).to(dtype).to(DEVICE)
    w = (torch.randint(-2, 3, (D, spec.n_router_outputs), generator=g) / 8).to(dtype).to(DEVICE)
    dw = torch.randn(T, spec.top_k, generator=g).to(DEVICE)
    grads = []
    for impl in (tg, ref):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        weights, ids, logits = impl.route(xa, wa, spec)
        z = torch.logsumexp(logits.float(), -1).pow(2).mean()
        ((weights.float() * dw).sum() + z).backward()
        grads.append((xa.grad, wa.grad, ids))
    (dxa, dwa, ia), (dxb, dwb, ib) = grads
    assert torch.equal(ia, ib)
    assert_close(dxa, dxb, table=GRAD_TOL)
    assert_close(dwa, dwb, table=GRAD_TOL)


def test_route_logits_only_grad():
    spec = SPECS[0]
    x, w = _route_inputs(9, 16, spec, torch.float32, seed=13)
    xa = x.clone().requires_grad_()
    _, _, logits = tg.route(xa, w, spec)
    logits.sum().backward()
    assert_close(xa.grad, w.sum(1).expand(9, -1), table=GRAD_TOL)


def test_gate_rejects_bad_shapes():
    spec = SPECS[0]
    with pytest.raises(ValueError):
        tg.gate(torch.zeros(3, 5, device=DEVICE), spec)
    with pytest.raises(ValueError):
        tg.gate(_logits(3, spec, torch.float32), spec,
                forced_groups_TK1=torch.zeros(3, 2, dtype=torch.long, device=DEVICE))


@st.composite
def _specs(draw):
    kind = draw(st.sampled_from(["flat", "group_limited", "two_level"]))
    G = draw(st.integers(1, 6))
    C = draw(st.integers(1, 9))
    k1 = draw(st.integers(1, G))
    k2 = draw(st.integers(1, C)) if kind == "two_level" else draw(st.integers(1, k1 * C))
    if kind != "two_level":
        k2 = max(1, min(k2, k1 * C // k1))
    return GateSpec(kind, G, C, k1, k2)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=_specs(), T=st.integers(0, 12), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES), ties=st.booleans())
def test_gate_property(spec, T, seed, dtype, ties):
    if ties:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randint(-1, 2, (T, spec.n_router_outputs), generator=g).to(dtype)
        logits = logits.to(DEVICE)
    else:
        logits = _logits(T, spec, dtype, seed=seed)
    w, ids = _check_gate(logits, spec)
    if T:
        assert (ids >= 0).all() and (ids < spec.n_experts).all()
        assert (ids.sort(1).values.diff(1) > 0).all()  # distinct per token
        assert_close(w.float().sum(1), _weight_sums(logits, ids, spec), dtype=dtype, table=TOL)


def _weight_sums(logits, ids, spec):
    """What a token's weights sum to: 1, or for two_level p(g) summed over the picked domains
    (level 2 renormalized within each domain; reference.py says why)."""
    T = logits.shape[0]
    if spec.kind != "two_level":
        return torch.ones(T, device=logits.device)
    p_TG = torch.softmax(logits[:, : spec.n_groups].float(), -1)
    return p_TG.gather(1, ids[:, :: spec.k2] // spec.n_components).sum(1)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [GateSpec("two_level", 8, 32, 2, 4), GateSpec("flat", 8, 8, 1, 2),
                                  GateSpec("group_limited", 8, 32, 2, 4)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["cublas", "fused"])
def test_gpu_large(spec, dtype, fused):
    T, D = 4099, 1024
    x, w = _route_inputs(T, D, spec, dtype, seed=21)
    wt, it, lt = tg.route(x, w, spec, fused=fused)
    wg, ig = ref.gate(lt, spec)
    assert torch.equal(it, ig)
    assert_close(wt, wg)
    assert_close(lt, ref.route(x, w, spec)[2], table=GRAD_TOL)
    wt2, it2 = tg.gate(lt, spec)
    assert torch.equal(it2, ig)
    assert_close(wt2, wg)
    dw = torch.randn_like(wt)
    a = lt.clone().requires_grad_()
    b = lt.clone().requires_grad_()
    (tg.gate(a, spec)[0].float() * dw).sum().backward()
    (ref.gate(b, spec)[0].float() * dw).sum().backward()
    assert_close(a.grad, b.grad, table=GRAD_TOL)


@pytest.mark.parametrize("spec", SPECS[:1] + SPECS[1::2], ids=_ids)
def test_route_unfused_path(spec):
    """fused=False (projection by torch matmul, then the gate kernel): same contract."""
    x, w = _route_inputs(23, 40, spec, torch.float32, seed=19)
    dw = torch.randn(23, spec.top_k, generator=torch.Generator().manual_seed(20)).to(DEVICE)
    out = []
    for fused in (False, True):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        weights, ids, logits = tg.route(xa, wa, spec, fused=fused)
        ((weights * dw).sum() + logits.square().mean()).backward()
        out.append((weights, ids, logits, xa.grad, wa.grad))
    (w0, i0, l0, dx0, dw0), (w1, i1, l1, dx1, dw1) = out
    assert torch.equal(i0, ref.gate(l0, spec)[1])
    assert_close(l0, l1)
    assert_close(w0, w1)
    assert_close(dx0, dx1, table=GRAD_TOL)
    assert_close(dw0, dw1, table=GRAD_TOL)


def test_gate_nan_logits_stay_in_range():
    """NaN logits match no maximum; the picks must still be valid expert ids (the component
    row load once followed an unclamped domain index of 2**30 out of the tensor)."""
    spec = GateSpec("two_level", 4, 8, 2, 2)
    logits = torch.full((5, spec.n_router_outputs), float("nan"), device=DEVICE)
    w, ids = tg.gate(logits, spec)
    assert ((ids >= 0) & (ids < spec.n_experts)).all()


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [0, 1, 7, 45])
def test_fused_route_matches_reference(spec, dtype, T):
    """The fused kernel (TMA tiles, zero-filled out of range; w re-laid for alignment where
    G or R is odd): ids equal the reference's on the returned logits, logits and weights
    within the dtype's tolerance, in several launch configurations (BK > D included)."""
    from kernels.routing.triton_route import fused_route_fwd

    x, w = _route_inputs(T, 32, spec, dtype, seed=T + 29)
    lr = ref.route(x.float(), w.float(), spec)[2]
    for kw in (dict(block_t=16, block_k=16, block_s=8), dict(block_t=16, block_k=64),
               dict(block_t=32, block_k=16, block_s=16), dict(block_t=16, persistent=True)):
        wt, it, lt = fused_route_fwd(x, w, spec, **kw)
        wg, ig = ref.gate(lt, spec)
        assert torch.equal(it, ig), kw
        assert_close(wt, wg, msg=str(kw))
        assert_close(lt, lr, dtype=dtype, table=GRAD_TOL, msg=str(kw))


def test_fused_route_projection_only_and_unsupported_inputs():
    """``select=False`` writes the same logits; inputs TMA cannot take are refused by the
    launcher (ValueError) and routed through the unfused pair by ``route``."""
    from kernels.routing.triton_route import fused_route_fwd, fused_route_supported

    spec = GateSpec("two_level", 3, 5, 2, 2)
    x, w = _route_inputs(19, 24, spec, torch.float32, seed=31)
    a = fused_route_fwd(x, w, spec, block_t=16, block_k=16)
    c = fused_route_fwd(x, w, spec, block_t=16, block_k=16, select=False)
    assert torch.equal(c[2], a[2])
    with pytest.raises(ValueError, match="block_k"):
        fused_route_fwd(x, w, spec, block_t=16, block_k=8)
    assert fused_route_supported(x, spec)
    assert not fused_route_supported(x, GateSpec("flat", 16, 17, 1, 2))  # E > 256
    x_odd, w_odd = _route_inputs(5, 23, spec, torch.float32, seed=32)  # rows of 92 bytes
    assert not fused_route_supported(x_odd, spec)
    with pytest.raises(ValueError, match="fused_route_supported"):
        fused_route_fwd(x_odd, w_odd, spec)
    wt, it, lt = tg.route(x_odd, w_odd, spec, fused=True)
    assert torch.equal(it, ref.gate(lt, spec)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [GateSpec("two_level", 8, 32, 2, 4), GateSpec("flat", 8, 8, 1, 2),
                                  GateSpec("group_limited", 8, 32, 2, 4),
                                  GateSpec("two_level", 3, 5, 2, 3)], ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opt", ["plain", "persistent"])
def test_gpu_fused_route(spec, dtype, opt):
    from kernels.routing.triton_route import fused_route_fwd

    x, w = _route_inputs(4099, 1024, spec, dtype, seed=33)
    wt, it, lt = fused_route_fwd(x, w, spec, persistent=opt == "persistent")
    wg, ig = ref.gate(lt, spec)
    assert torch.equal(it, ig)
    assert_close(wt, wg)
    assert_close(lt, ref.route(x, w, spec)[2], table=GRAD_TOL)
