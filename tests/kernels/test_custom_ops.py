"""The routing ops as ``torch.library`` custom ops: ``torch.library.opcheck`` checks each one's
schema, fake implementation (shapes, dtypes, strides against the real kernel), autograd
registration and AOT dispatch — what ``torch.compile(fullgraph=True)`` relies on — for the
forward ops and the backward ops their autograd formulas call. On CPU the Triton kernels run
in the interpreter; the ``gpu`` variants run the same checks on CUDA (bf16 where the fast
grouped matmul applies).
"""

from __future__ import annotations

import pytest
import torch
from _routing_utils import DEVICE

import kernels.routing.grouped  # noqa: F401  (registers mhc::grouped_mm)
import kernels.routing.triton_ops  # noqa: F401  (registers the routing ops)
from kernels.routing import reference as ref
from kernels.routing.reference import GateSpec

SPEC = GateSpec("two_level", 3, 4, 2, 2)
FIELDS = ("two_level", 3, 4, 2, 2)


def _cases(device, dtype):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=True, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)
        return t.requires_grad_(grad)

    T, D, R, K, E = 9, 16, SPEC.n_router_outputs, SPEC.top_k, SPEC.n_experts
    logits = rnd(T, R)
    ids = ref.gate(logits.detach(), SPEC)[1]
    x = rnd(T, D)
    _, order, _ = ref.permute(x.detach(), ids, E)
    inv = torch.empty_like(order, dtype=torch.int32)
    inv[order] = torch.arange(order.numel(), device=device, dtype=torch.int32)
    counts = torch.tensor([3, 0, 5, 1], device=device)
    fwd = {
        "gate": ("gate", (logits, None, None, *FIELDS)),
        "gate_bias_forced": ("gate", (logits, rnd(R, grad=False, scale=0.1),
                                      ids[:, ::2] // SPEC.n_components, *FIELDS)),
        "route": ("route", (x, rnd(D, R, scale=0.25), None, None, *FIELDS, False)),
        "route_fused": ("route", (x, rnd(D, R, scale=0.25), None, None, *FIELDS, True)),
        "permute": ("permute", (x, ids, E)),
        "combine": ("combine", (rnd(T * K, D), order, rnd(T, K))),
        "expert_counts": ("expert_counts", (ids, E)),
        "grouped_mm": ("grouped_mm", (rnd(9, 16), rnd(4, 16, 8), counts)),
        "grouped_mm_odd_widths": ("grouped_mm", (rnd(9, 12), rnd(4, 12, 6), counts)),
    }
    bwd = {
        "gate_backward": ("gate_backward", (logits.detach(), ids, rnd(T, K, grad=False),
                                            rnd(T, R, grad=False), *FIELDS)),
        "permute_backward": ("permute_backward", (rnd(T * K, D, grad=False), inv, T, K)),
        "combine_backward": ("combine_backward", (rnd(T, D, grad=False), rnd(T * K, D, grad=False),
                                                  inv, rnd(T, K, grad=False))),
        "grouped_mm_backward": ("grouped_mm_backward", (rnd(9, 8, grad=False),
                                                        rnd(9, 16, grad=False),
                                                        rnd(4, 16, 8, grad=False), counts)),
    }
    return {**fwd, **bwd}


NAMES = list(_cases("cpu", torch.float32))


def _opcheck(name, device, dtype):
    op_name, args = _cases(device, dtype)[name]
    result = torch.library.opcheck(getattr(torch.ops.mhc, op_name).default, args)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("name", NAMES)
def test_opcheck(name):
    _opcheck(name, DEVICE, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_opcheck_bf16(name):
    _opcheck(name, "cuda", torch.bfloat16)


def test_grouped_mm_loop_gradients_match_autograd():
    """The CPU path's own backward (loop) against autograd through the reference loop."""
    g = torch.Generator().manual_seed(3)
    counts = torch.tensor([4, 0, 2, 5])
    x = torch.randn(11, 8, generator=g)
    w = torch.randn(4, 8, 6, generator=g)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    dy = torch.randn(11, 6, generator=g)
    (kernels.routing.grouped.grouped_mm(xa, wa, counts) * dy).sum().backward()
    (ref.grouped_mm(xb, wb, counts) * dy).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(wa.grad, wb.grad)
    assert wa.grad[1].abs().max() == 0  # an empty group gets a zero gradient


def test_grouped_mm_rejects_bad_shapes():
    from kernels.routing.grouped import grouped_mm

    with pytest.raises(ValueError, match="columns"):
        grouped_mm(torch.zeros(3, 5), torch.zeros(2, 4, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="one per group"):
        grouped_mm(torch.zeros(3, 4), torch.zeros(2, 4, 4), torch.tensor([3]))

