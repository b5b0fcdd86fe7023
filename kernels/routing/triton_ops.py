"""Triton routing ops as ``torch.library`` custom ops, with the reference's signatures.

Shape legend: see ``kernels/__init__.py``. ``kernels.routing.ops`` dispatches here when
``MHC_KERNELS`` resolves to ``triton``. The kernels and their launchers live in
``triton_gate`` (router projection + two-level gating, forward and backward), ``triton_route``
(the one-kernel projection + selection) and ``triton_permute`` (sort, gather, combine).

Each op is a ``torch.library.custom_op`` (namespace ``mhc``) with a fake implementation and a
registered autograd formula whose backward is itself a custom op, so ``torch.compile``
(``fullgraph=True``) traces a model through them and AOTAutograd sees the backward; none of
them synchronizes with the host, so a step can be captured in a CUDA graph. Integer outputs
(ids, order, counts) are non-differentiable. Ops that need an index for their backward
return it as an extra output (``permute``: ``inv_N``; ``combine``: ``inv_N``), which the
public functions drop. A ``GateSpec`` travels as its five fields.
"""

from __future__ import annotations

import torch

from kernels.routing import triton_gate as tg
from kernels.routing import triton_permute as tp
from kernels.routing.reference import GateSpec

Tensor = torch.Tensor


def _spec(kind, G, C, k1, k2) -> GateSpec:
    return GateSpec(kind, G, C, k1, k2)


def _fields(spec: GateSpec):
    return spec.kind, spec.n_groups, spec.n_components, spec.k1, spec.k2


# ----------------------------------------------------------------------------- gate


@torch.library.custom_op("mhc::gate", mutates_args=())
def _gate(logits_TR: Tensor, bias_R: Tensor | None, forced_TK1: Tensor | None, kind: str,
          G: int, C: int, k1: int, k2: int) -> tuple[Tensor, Tensor]:
    return tg.gate_fwd(logits_TR, _spec(kind, G, C, k1, k2), bias_R, forced_TK1)


@_gate.register_fake
def _(logits_TR, bias_R, forced_TK1, kind, G, C, k1, k2):
    T, K = logits_TR.shape[0], k1 * k2
    return logits_TR.new_empty(T, K), logits_TR.new_empty(T, K, dtype=torch.int64)


@torch.library.custom_op("mhc::gate_backward", mutates_args=())
def _gate_backward(logits_TR: Tensor, ids_TK: Tensor, dweights_TK: Tensor,
                   dlogits_TR: Tensor | None, kind: str, G: int, C: int, k1: int, k2: int
                   ) -> Tensor:
    return tg.gate_bwd(logits_TR, ids_TK, dweights_TK, _spec(kind, G, C, k1, k2), dlogits_TR,
                       out_dtype=logits_TR.dtype)


@_gate_backward.register_fake
def _(logits_TR, ids_TK, dweights_TK, dlogits_TR, kind, G, C, k1, k2):
    return torch.empty_like(logits_TR)


def _gate_setup(ctx, inputs, output):
    ctx.fields = inputs[3:]
    ctx.save_for_backward(inputs[0], output[1])


def _gate_grad(ctx, dweights_TK, _dids):
    logits_TR, ids_TK = ctx.saved_tensors
    dl = torch.ops.mhc.gate_backward(logits_TR, ids_TK, dweights_TK, None, *ctx.fields)
    return dl, None, None, None, None, None, None, None


torch.library.register_autograd("mhc::gate", _gate_grad, setup_context=_gate_setup)


def gate(logits_TR, spec: GateSpec, bias_R=None, forced_groups_TK1=None):
    """Same signature and semantics as ``reference.gate``: ``(weights_TK, ids_TK)``."""
    tg.check_inputs(spec, logits_TR.shape[1], bias_R, forced_groups_TK1, logits_TR.shape[0])
    return torch.ops.mhc.gate(logits_TR, bias_R, forced_groups_TK1, *_fields(spec))


# ----------------------------------------------------------------------------- route


@torch.library.custom_op("mhc::route", mutates_args=())
def _route(x_TD: Tensor, w_DR: Tensor, bias_R: Tensor | None, forced_TK1: Tensor | None,
           kind: str, G: int, C: int, k1: int, k2: int, fused: bool
           ) -> tuple[Tensor, Tensor, Tensor]:
    spec = _spec(kind, G, C, k1, k2)
    from kernels.routing.triton_route import fused_route_fwd, fused_route_supported

    if fused and fused_route_supported(x_TD, spec):
        return fused_route_fwd(x_TD, w_DR, spec, bias_R, forced_TK1)
    logits_TR = x_TD @ w_DR.to(x_TD.dtype)
    return (*tg.gate_fwd(logits_TR, spec, bias_R, forced_TK1), logits_TR)


@_route.register_fake
def _(x_TD, w_DR, bias_R, forced_TK1, kind, G, C, k1, k2, fused):
    T, K = x_TD.shape[0], k1 * k2
    return (x_TD.new_empty(T, K), x_TD.new_empty(T, K, dtype=torch.int64),
            x_TD.new_empty(T, w_DR.shape[1]))


def _route_setup(ctx, inputs, output):
    ctx.fields = inputs[4:9]
    ctx.save_for_backward(inputs[0], inputs[1], output[2], output[1])


def _route_grad(ctx, dweights_TK, _dids, dlogits_TR):
    """d logits from the weights (gate backward) plus the logits' own gradient (aux/z
    losses), then the projection's backward."""
    x_TD, w_DR, logits_TR, ids_TK = ctx.saved_tensors
    dl = torch.ops.mhc.gate_backward(logits_TR, ids_TK, dweights_TK, dlogits_TR, *ctx.fields)
    dl = dl.to(x_TD.dtype)
    dx = dl @ w_DR.to(x_TD.dtype).t() if ctx.needs_input_grad[0] else None
    dw = (x_TD.t() @ dl).to(w_DR.dtype) if ctx.needs_input_grad[1] else None
    return dx, dw, None, None, None, None, None, None, None, None


torch.library.register_autograd("mhc::route", _route_grad, setup_context=_route_setup)


def route(x_TD, w_DR, spec: GateSpec, bias_R=None, forced_groups_TK1=None, fused=None):
    """Same as ``reference.route`` (``logits_TR`` in x's dtype).

    ``fused=True``: one kernel (``triton_route.fused_route_fwd``: projection + selection, x
    read once) where ``fused_route_supported`` holds, else the unfused pair.
    ``fused=False``: the projection through cuBLAS, then the gate kernel. Default:
    ``MHC_ROUTE_FUSED`` (``0``), because on the H100 the unfused pair measured faster at
    E=256 and equal at E=64 (docs/benchmarks.md); on CPU (interpreter) the fused kernel.
    """
    if w_DR.shape[0] != x_TD.shape[1]:
        raise ValueError(f"w_DR has {w_DR.shape[0]} rows, x_TD has D={x_TD.shape[1]}")
    tg.check_inputs(spec, w_DR.shape[1], bias_R, forced_groups_TK1, x_TD.shape[0])
    if fused is None:
        fused = tg.FUSED_DEFAULT or not x_TD.is_cuda
    return torch.ops.mhc.route(x_TD, w_DR, bias_R, forced_groups_TK1, *_fields(spec),
                               bool(fused))


# ----------------------------------------------------------------------------- permute


@torch.library.custom_op("mhc::permute", mutates_args=())
def _permute(x_TD: Tensor, ids_TK: Tensor, n_experts: int
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    order_N, inv_N, counts_E = tp.sort_slots(ids_TK, n_experts)
    return tp.scatter_rows(x_TD, inv_N, ids_TK.shape[1]), order_N, inv_N, counts_E


@_permute.register_fake
def _(x_TD, ids_TK, n_experts):
    N = ids_TK.numel()
    return (x_TD.new_empty(N, x_TD.shape[1]), ids_TK.new_empty(N, dtype=torch.int64),
            ids_TK.new_empty(N, dtype=torch.int32), ids_TK.new_empty(n_experts,
                                                                     dtype=torch.int64))


@torch.library.custom_op("mhc::permute_backward", mutates_args=())
def _permute_backward(dx_ND: Tensor, inv_N: Tensor, T: int, K: int) -> Tensor:
    return tp.gather_sum(dx_ND, inv_N, None, T, K)


@_permute_backward.register_fake
def _(dx_ND, inv_N, T, K):
    return dx_ND.new_empty(T, dx_ND.shape[1])


def _permute_setup(ctx, inputs, output):
    ctx.TK = tuple(inputs[1].shape)
    ctx.save_for_backward(output[2])


def _permute_grad(ctx, dx_ND, _dorder, _dinv, _dcounts):
    (inv_N,) = ctx.saved_tensors
    return torch.ops.mhc.permute_backward(dx_ND, inv_N, *ctx.TK), None, None


torch.library.register_autograd("mhc::permute", _permute_grad, setup_context=_permute_setup)


def permute(x_TD: Tensor, ids_TK: Tensor, n_experts: int):
    """Same as ``reference.permute``: ``(x_ND, order_N, counts_E)``."""
    x_ND, order_N, _inv, counts_E = torch.ops.mhc.permute(x_TD, ids_TK, n_experts)
    return x_ND, order_N, counts_E


# ----------------------------------------------------------------------------- combine


@torch.library.custom_op("mhc::combine", mutates_args=())
def _combine(y_ND: Tensor, order_N: Tensor, weights_TK: Tensor) -> tuple[Tensor, Tensor]:
    T, K = weights_TK.shape
    inv_N = tp.invert(order_N)
    return tp.gather_sum(y_ND, inv_N, weights_TK, T, K), inv_N


@_combine.register_fake
def _(y_ND, order_N, weights_TK):
    return (y_ND.new_empty(weights_TK.shape[0], y_ND.shape[1]),
            order_N.new_empty(order_N.shape, dtype=torch.int32))


@torch.library.custom_op("mhc::combine_backward", mutates_args=())
def _combine_backward(dout_TD: Tensor, y_ND: Tensor, inv_N: Tensor, weights_TK: Tensor
                      ) -> tuple[Tensor, Tensor]:
    return tp.combine_bwd(dout_TD.to(y_ND.dtype), y_ND, inv_N, weights_TK)


@_combine_backward.register_fake
def _(dout_TD, y_ND, inv_N, weights_TK):
    return torch.empty_like(y_ND), torch.empty_like(weights_TK)


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1], inputs[2])


def _combine_grad(ctx, dout_TD, _dinv):
    y_ND, inv_N, weights_TK = ctx.saved_tensors
    dy, dw = torch.ops.mhc.combine_backward(dout_TD, y_ND, inv_N, weights_TK)
    return dy, None, dw


torch.library.register_autograd("mhc::combine", _combine_grad, setup_context=_combine_setup)


def combine(y_ND: Tensor, order_N: Tensor, weights_TK: Tensor) -> Tensor:
    """Same as ``reference.combine``: weighted sum of each token's K expert outputs."""
    return torch.ops.mhc.combine(y_ND, order_N, weights_TK)[0]


# ----------------------------------------------------------------------------- counts


@torch.library.custom_op("mhc::expert_counts", mutates_args=())
def _expert_counts(ids_TK: Tensor, n_experts: int) -> Tensor:
    return tp.sort_slots(ids_TK, n_experts)[2]


@_expert_counts.register_fake
def _(ids_TK, n_experts):
    return ids_TK.new_empty(n_experts, dtype=torch.int64)


def expert_counts(ids_TK: Tensor, n_experts: int) -> Tensor:
    """Tokens routed to each expert (int64 ``counts_E``), without a host sync."""
    return torch.ops.mhc.expert_counts(ids_TK, n_experts)


__all__ = ["route", "gate", "permute", "combine", "expert_counts"]
