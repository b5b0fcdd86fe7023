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
Under ``torch.compile`` or CUDA-graph capture the cast stays in the graph (once per forward):
a compiled graph cannot ask whether a step happened, and a captured one must re-cast on every
replay. Under inference mode nothing is cached (an inference tensor cannot join autograd).

**Attached copies** (``attach``): an optimizer that updates the master and rewrites its copy
in one pass (``sessions.optimizer.AdamW``) attaches a persistent copy, a leaf that requires
grad. The forward then reads that copy as it is, in eager mode, under CUDA-graph capture and
in inference, and its gradient stays in the copy's dtype, in ``copy.grad``, for the optimizer
to apply. Only a master changed by anything else (its version counter or storage moved:
``load_state_dict``, ``.to()``, in-place edits) makes the forward re-cast it into the copy.
A compiled forward reads the copy as a graph input, and a replayed CUDA graph reads it as
captured: neither can run that check, so ``refresh`` makes it outside them (the trainer, before
every step). ``detach`` ends the arrangement (any new ``sessions.optimizer.AdamW`` detaches
the copies of its parameters that it does not own).
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


class _MasterGrad(torch.autograd.Function):
    """The cached copy in the forward; its gradient, cast to the master's dtype, for the
    master in the backward."""

    @staticmethod
    def forward(ctx, master, copy):
        ctx.dtype = master.dtype
        return copy

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def attach(master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Give ``master`` a persistent copy in ``dtype`` (a leaf requiring grad) that the
    forward reads and the caller (an optimizer) keeps equal to the master; returns it."""
    with torch.inference_mode(False), torch.no_grad():
        copy = master.detach().to(dtype).requires_grad_(master.requires_grad)
    master._attached_copy = copy
    master._attached_stamp = _stamp(master)
    return copy


def detach(master: torch.Tensor) -> None:
    """Drop ``master``'s attached copy (its forward casts again, its gradient is its own)."""
    for name in ("_attached_copy", "_attached_stamp"):
        master.__dict__.pop(name, None)


def zero_grad(params, set_to_none: bool = True) -> None:
    """Clear the gradients of the attached copies of ``params`` (``model.zero_grad()``
    clears the parameters' own only)."""
    for p in params:
        copy = attached(p)
        if copy is not None and copy.grad is not None:
            if set_to_none:
                copy.grad = None
            else:
                copy.grad.zero_()


def attached(master: torch.Tensor) -> torch.Tensor | None:
    """``master``'s attached copy, or None."""
    return getattr(master, "_attached_copy", None)


def mark_current(master: torch.Tensor) -> None:
    """Declare ``master``'s attached copy equal to it (its owner just wrote both), so the
    version counter the owner's own in-place update moved does not trigger a re-cast."""
    master._attached_stamp = _stamp(master)


def refresh(params) -> None:
    """Re-cast the attached copy of every master in ``params`` that changed other than
    through its owner (outside compiled or captured code: the trainer calls this before
    each step, so compiled forwards and graph replays read current copies)."""
    for p in params:
        copy = attached(p)
        if copy is not None:
            _read_attached(p, copy)


def _stamp(master: torch.Tensor) -> tuple:
    return master.data_ptr(), master._version, master.device, master.shape


def _read_attached(master: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
    if master._attached_stamp != _stamp(master):  # changed by something else: re-cast
        if copy.shape != master.shape or copy.device != master.device:
            copy = attach(master, copy.dtype)  # the owner reads it through attached()
        else:
            with torch.inference_mode(False), torch.no_grad():
                copy.copy_(master)
            master._attached_stamp = _stamp(master)
    return copy


def compute_weight(cache: dict, name: str, master: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """``master`` in ``dtype``: its attached copy (``attach``) when it has one, else from
    ``cache`` (a dict the owning module keeps) when still valid; differentiable w.r.t.
    ``master`` (or, for an attached copy, w.r.t. the copy)."""
    if master.dtype == dtype:
        return master
    copy = attached(master)
    if copy is not None and copy.dtype == dtype:
        if torch.compiler.is_compiling():  # a graph input; freshness: refresh(), outside
            return copy
        return _read_attached(master, copy)
    if (torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
            or (master.is_cuda and torch.cuda.is_current_stream_capturing())):
        return master.to(dtype)
    _install_hook()
    stamp = (_generation, master.data_ptr(), master._version, master.device, dtype)
    hit = cache.get(name)
    if hit is None or hit[0] != stamp:
        with torch.no_grad():
            hit = cache[name] = (stamp, master.detach().to(dtype))
    if torch.is_grad_enabled() and master.requires_grad:
        return _MasterGrad.apply(master, hit[1])
    return hit[1]
