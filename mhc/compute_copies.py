"""Compute-dtype copies of fp32 master weights, made once per optimizer step.

Under bf16 autocast the expert matmuls (``torch._grouped_mm``) need bf16 weights. Casting the
fp32 masters in every forward costs 6 bytes of traffic per parameter per forward; with
gradient accumulation or evaluation between steps that is once per forward, not once per
step. ``compute_weight`` keeps one copy per master and re-makes it only when the master may
have changed:

* after any ``torch.optim`` optimizer step: a global step post-hook bumps a generation
  (fused AdamW updates parameters without moving their version counters, so version
  counters alone would let the copy go stale);
* when the master's storage or version counter moved (``load_state_dict``, ``.to()``,
  in-place edits under ``no_grad``).

Edits through ``.data`` escape both: call ``invalidate()`` after one. The copy's gradient
reaches the master in the master's dtype (fp32 gradients, fp32 optimizer state).
``compute_concat`` does the same for several masters side by side along the last dim (one
copy, one matmul for the experts' gate and up projections; the gradient is split back).
Under ``torch.compile`` or CUDA-graph capture the cast stays in the graph (once per forward):
a compiled graph cannot ask whether a step happened, and a captured one must re-cast on every
replay. Under inference mode nothing is cached (an inference tensor cannot join autograd).
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_generation = 0
_hook = None


def invalidate(*_ignored) -> None:
    """Mark every cached copy stale (the optimizer step post-hook calls this)."""
    global _generation
    _generation += 1


def _install_hook() -> None:
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_post_hook(invalidate)


class _Concat(torch.autograd.Function):
    """The masters side by side along the last dim in ``dtype`` — the cached ``copy``, or
    (``copy`` None: capture, inference) cast now, one pass per master with no intermediate —
    and in the backward the gradient split back and cast to each master's dtype."""

    @staticmethod
    def forward(ctx, copy, dtype, *masters):
        ctx.dtypes = [m.dtype for m in masters]
        ctx.widths = [m.shape[-1] for m in masters]
        return copy if copy is not None else _concat_cast(masters, dtype)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *(g.to(dt) for g, dt in
                              zip(grad.split(ctx.widths, -1), ctx.dtypes, strict=True)))


def _concat_cast(masters, dtype: torch.dtype) -> torch.Tensor:
    first = masters[0]
    out = first.new_empty(*first.shape[:-1], sum(m.shape[-1] for m in masters), dtype=dtype)
    for part, m in zip(out.split([m.shape[-1] for m in masters], -1), masters, strict=True):
        part.copy_(m.detach())
    return out


def compute_weight(cache: dict, name: str, master: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """``master`` in ``dtype``, from ``cache`` (a dict the owning module keeps) when still
    valid, differentiable w.r.t. ``master``."""
    if master.dtype == dtype:
        return master
    return compute_concat(cache, name, [master], dtype)


def compute_concat(cache: dict, name: str, masters: list[torch.Tensor],
                   dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat(masters, dim=-1)`` in ``dtype`` (e.g. gate and up projections side by side
    for one matmul), cached like ``compute_weight``, differentiable w.r.t. every master."""
    if torch.compiler.is_compiling():  # Inductor fuses the casts into the concatenation
        return torch.cat([m.to(dtype) for m in masters], -1) if len(masters) > 1 else \
            masters[0].to(dtype)
    first = masters[0]
    if torch.is_inference_mode_enabled() or (first.is_cuda and
                                             torch.cuda.is_current_stream_capturing()):
        return _Concat.apply(None, dtype, *masters)
    _install_hook()
    stamp = (_generation, dtype, *((m.data_ptr(), m._version, m.device) for m in masters))
    hit = cache.get(name)
    if hit is None or hit[0] != stamp:
        with torch.no_grad():
            hit = cache[name] = (stamp, _concat_cast(masters, dtype))
    if torch.is_grad_enabled() and any(m.requires_grad for m in masters):
        return _Concat.apply(hit[1], dtype, *masters)
    return hit[1]
