"""The experts (fused gate|up and down grouped matmuls, SwiGLU between) against the SwiGLU
definition written out per slot (an independent path: one plain matmul chain per expert,
component sharing and the low-rank delta applied from their definitions), forward and every
gradient, for every sharing mode and counts with empty experts. CPU in float64 (exact up to
rounding); on a GPU (marked ``gpu``) the bf16 fast path against the float64 reference, the
number of grouped matmuls one layer makes (2 per direction, 6 with low-rank sharing) and
that its SwiGLU took the Triton kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels.mlp
from kernels.routing import grouped
from mhc.config import FFNConfig
from mhc.experts import Experts

G, C, D, FH, R = 2, 3, 16, 8, 4
CALLS_PER_FORWARD = {"none": 2, "base": 2, "lowrank": 6}


def _experts(sharing: str, dtype=torch.float64) -> Experts:
    cfg = FFNConfig(kind="hierarchical", hidden=FH, n_domains=G, n_components=C, k1=1, k2=2,
                    sharing=sharing, lowrank_rank=R)
    torch.manual_seed(0)
    ex = Experts(D, cfg)
    with torch.no_grad():  # non-zero low-rank B so the delta is exercised
        for name, p in ex.named_parameters():
            if name.startswith("b_"):
                p.normal_(0, 0.3)
    return ex.to(dtype)  # the same values in every dtype


def reference(ex: Experts, x_ND: torch.Tensor, counts_P: torch.Tensor) -> torch.Tensor:
    """Slot p = c·G + g holds expert (g, c); shared parts are indexed by component c."""
    out, start = [], 0
    shared = ex.cfg.sharing != "none"
    for p, n in enumerate(counts_P.tolist()):
        rows = x_ND[start:start + n]
        start += n
        i = p // G if shared else p
        wg, wu = ex.w_gate_up_PDH[i].chunk(2, dim=-1)
        if ex.cfg.sharing == "lowrank":
            wg = wg + ex.a_gate_PDr[p] @ ex.b_gate_PrF[p]
            wu = wu + ex.a_up_PDr[p] @ ex.b_up_PrF[p]
        out.append((F.silu(rows @ wg) * (rows @ wu)) @ ex.w_down_PFD[p])
    return torch.cat(out, 0)


def _inputs(device, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 7, (G * C,), generator=g)
    counts[1] = 0  # an empty expert
    x = torch.randn(int(counts.sum()), D, generator=g, dtype=torch.float64)
    return x.to(device, dtype).requires_grad_(), counts.to(device)


def _grads(ex, x, y, dy):
    names = [n for n, _ in ex.named_parameters()]
    got = torch.autograd.grad(y, [x, *ex.parameters()], dy)
    return dict(zip(["x", *names], got, strict=True))


@pytest.mark.parametrize("sharing", ["none", "base", "lowrank"])
def test_fused_experts_equal_the_definition(sharing):
    ex = _experts(sharing)
    x, counts = _inputs("cpu", torch.float64)
    y = ex(x, counts)
    ref = reference(ex, x, counts)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    got, want = _grads(ex, x, y, dy), _grads(ex, x, ref, dy)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12, msg=name)
    assert ex.w_gate_up_PDH.shape[0] == (G * C if sharing == "none" else C)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sharing", ["none", "base", "lowrank"])
def test_fused_experts_fast_path_on_gpu(sharing):
    exact = _experts(sharing).cuda()
    ex = _experts(sharing, torch.float32).cuda()  # fp32 masters, bf16 compute copies
    x64, counts = _inputs("cuda", torch.float64)
    x = x64.detach().bfloat16().requires_grad_()
    grouped.CALLS.clear()
    kernels.mlp.CALLS.clear()
    y = ex(x, counts)
    dy = torch.randn_like(y)
    got = _grads(ex, x, y, dy)
    n = CALLS_PER_FORWARD[sharing]
    assert grouped.CALLS == {"fast": n, "fast_backward": n}, grouped.CALLS
    assert kernels.mlp.CALLS == {"triton": 1}, kernels.mlp.CALLS
    ref = reference(exact, x64, counts)
    want = _grads(exact, x64, ref, dy.double())

    def rel(a, b):
        return float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))

    assert rel(y, ref) < 2e-2  # bf16 operands
    for name in want:
        assert got[name].dtype == (torch.bfloat16 if name == "x" else torch.float32), name
        assert rel(got[name], want[name]) < 3e-2, name
