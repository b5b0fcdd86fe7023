"""The trainer's optimizer: torch's AdamW (fused on CUDA), whose expert weights are updated
from their bf16 gradients by our own kernel, which also writes their bf16 compute copies.

Under bf16 autocast the experts (``mhc.experts``) compute with bf16 copies of their fp32
master weights. With ``compute_copies=True`` the optimizer owns those copies
(``mhc.compute_copies.attach``): the forward reads them as they are, their gradients stay
bf16 (autograd accumulates into the copy, a leaf), and ``step`` updates each master from its
copy's gradient and rewrites the copy in one pass (``kernels.optim.adamw_step_``: 28 B per
parameter instead of 40 for cast-gradient + fused AdamW + cast-weight; the experts are 98 %
of the MoE model's parameters). Every other parameter goes through torch's AdamW unchanged.
The update, the state (``exp_avg``, ``exp_avg_sq``, ``step`` per master) and the state dict
are torch's AdamW's, so checkpoints move freely between the two.

The trainer turns copies on for one CUDA process and an objective of one forward a step
(``Trainer``): DDP and FSDP reduce the gradients of parameters, not of copies, and several
reads of a copy in one step would sum their gradients in bf16. A compiled forward reads the
copies as graph inputs. ``grad_norm`` is the norm over every gradient the step will apply, in
fp32 (the clipping the trainer folds into ``grad_scale``); ``zero_grad`` clears the copies'
gradients too (``model.zero_grad()`` does not: it knows parameters only).
"""

from __future__ import annotations

import math

import torch

from kernels.optim import adamw_step_
from mhc import compute_copies
from mhc.config import TrainConfig


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device,
                   compute_copies: bool = False) -> AdamW:
    """AdamW over ``model`` (weight decay on matrices only; fused on CUDA); with
    ``compute_copies`` the experts' weights train through their bf16 copies."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    masters = _expert_weights(model) if compute_copies else []
    return AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda",
                 copy_masters=masters)


def _expert_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    from mhc.experts import Experts

    return [p for m in model.modules() if isinstance(m, Experts)
            for p in m.parameters(recurse=False)]


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` plus bf16 compute copies, written by the step, for the
    parameters in ``copy_masters`` (fp32, contiguous; see the module docstring)."""

    def __init__(self, params, *, copy_masters=(), copy_dtype: torch.dtype = torch.bfloat16,
                 **kwargs):
        super().__init__(params, **kwargs)
        copy_masters = list(copy_masters)
        if copy_masters and (self.defaults["amsgrad"] or self.defaults["maximize"]):
            raise ValueError("AdamW: compute copies support neither amsgrad nor maximize")
        for p in copy_masters:
            if p.dtype != torch.float32 or not p.is_contiguous():
                raise ValueError(f"AdamW: a compute copy's master must be a contiguous fp32 "
                                 f"weight; got {p.dtype}, shape {tuple(p.shape)}")
            if p.is_cuda and not (self.defaults["fused"] or self.defaults["capturable"]):
                raise ValueError("AdamW: compute copies on CUDA need fused=True or "
                                 "capturable=True (the step count lives on the device)")
        ids = {id(p) for p in copy_masters}
        self._copied = [[p for p in g["params"] if id(p) in ids] for g in self.param_groups]
        if sum(map(len, self._copied)) != len(ids):
            raise ValueError("AdamW: every compute-copy master must be one of the parameters")
        # checked first: a refused optimizer changes nothing. Copies a previous optimizer
        # attached to these parameters are dropped: only their owner keeps them current.
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) not in ids:
                    compute_copies.detach(p)
        for p in copy_masters:
            compute_copies.attach(p, copy_dtype)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_copied"):  # after __init__: a group without copies
            self._copied.append([])

    def copy_masters(self) -> list[torch.Tensor]:
        """The parameters whose compute copies this optimizer owns."""
        return [p for ps in self._copied for p in ps]

    def _gradient(self, p: torch.Tensor) -> torch.Tensor | None:
        """The gradient of copied master ``p``: its copy's, or its own (fp32: a forward that
        did not read the copy) with the copy's added into it (then the copy has none)."""
        copy = compute_copies.attached(p)
        if p.grad is None:
            return copy.grad
        if copy.grad is not None:
            p.grad.add_(copy.grad)
            copy.grad = None
        return p.grad

    def gradients(self) -> list[torch.Tensor]:
        """Every gradient the next ``step`` applies (one per parameter that has one)."""
        copied = {id(p) for ps in self._copied for p in ps}
        grads = [p.grad for g in self.param_groups for p in g["params"]
                 if id(p) not in copied and p.grad is not None]
        return grads + [g for ps in self._copied for p in ps
                        if (g := self._gradient(p)) is not None]

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of all of ``gradients()``, in fp32, on the device (no host sync)."""
        grads = self.gradients()
        if not grads:
            return torch.zeros(())
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        norms = [n for gs in by_dtype.values()
                 for n in torch._foreach_norm(gs, 2.0, dtype=torch.float32)]
        return torch.linalg.vector_norm(torch.stack(norms))

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        compute_copies.zero_grad((p for ps in self._copied for p in ps), set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # first, as torch does: its backward makes the gradients
            with torch.enable_grad():
                loss = closure()
        pending = []  # per group: (master, gradient) of its copied masters that have one
        hidden = []  # (master, its own fp32 .grad): hidden from torch's step, put back after
        for ps in self._copied:
            pending.append([])
            for p in ps:
                g = self._gradient(p) if p.requires_grad else None
                if g is None:  # no gradient, or frozen: torch skips it too
                    continue
                pending[-1].append((p, g))
                if p.grad is not None:
                    hidden.append((p, p.grad))
                    p.grad = None
        try:
            super().step()
        finally:
            for p, g in hidden:
                p.grad = g
        for group, todo in zip(self.param_groups, pending, strict=True):
            if todo:
                self._copy_step(group, todo)
        return loss

    def _copy_step(self, group: dict, todo: list) -> None:
        for p, _ in todo:
            state = self.state[p]
            if not state:  # torch AdamW's layout (the step on the weight's device)
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != p.device:  # saved without fused/capturable: on CPU
                state["step"] = state["step"].to(p.device)
        steps = [self.state[p]["step"] for p, _ in todo]
        torch._foreach_add_(steps, 1.0)
        beta1, beta2 = group["betas"]
        bias1, bias2 = (_one_minus_powers(beta, steps) for beta in (beta1, beta2))
        scale = getattr(self, "grad_scale", None)
        for (p, g), b1, b2 in zip(todo, bias1, bias2, strict=True):
            state = self.state[p]
            adamw_step_(p, g, state["exp_avg"], state["exp_avg_sq"], compute_copies.attached(p),
                        b1, b2, group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
                        scale)
            compute_copies.mark_current(p)  # the torch reference's in-place ops moved _version


def _one_minus_powers(beta: float, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """``1 - beta ** step`` for each (fp32, on-device) step tensor: the bias corrections,
    three foreach launches for all weights. As ``-expm1(step · log β)``, with ``log β`` taken
    in double on the host: ``1 - pow`` in fp32 cancels near β = 1 (β2 = 0.9999, step 1: 1.7e-4
    relative error), where torch's non-capturable AdamW, computing in double, does not."""
    out = torch._foreach_mul(steps, math.log(beta))
    torch._foreach_expm1_(out)
    torch._foreach_neg_(out)
    return out
