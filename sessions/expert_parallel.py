"""Expert parallelism: the experts of an MoE layer placed on the ranks, each routed row sent
to the rank that owns its expert and its output sent back (all-to-all).

``train.parallel=ep`` (``PlacedExperts``, used by ``sessions.distributed``) trains with every
MoE layer's experts placed on the ranks and everything else replicated under DDP.

* ``ExpertPlacement(n_slots, world_size)``: rank r owns the contiguous expert slots
  ``r·L .. (r+1)·L - 1`` (L = P / W; slots are the experts' storage order, component-major:
  slot p = c·G + g holds expert g·C + c).
* ``ExpertParallel(placement)``: ``dispatch(x_ND, counts_P)`` takes this rank's routed rows
  (sorted by slot, as ``ops.permute`` makes them) and returns the rows of every rank routed
  to this rank's slots, sorted by local slot, with their counts; ``combine(y_MD, plan)``
  sends the outputs back, in the original order. One all-to-all of the counts (and one host
  read of the split sizes) and one of the rows each way; both directions are differentiable
  (the backward of an all-to-all is the reverse one).
* ``ExpertParallelExperts(experts, ep)``: a drop-in for ``mhc.experts.Experts`` in
  ``MHCFFN``: it keeps only this rank's experts (``sharing=none``: a shared base would span
  ranks) and computes ``dispatch -> local experts -> combine``.

* ``PlacedExperts(model, W)``: places the experts of every block (``sharing=none``), keeps
  the expert parameters out of DDP's all-reduce and divides their gradients by W (a local
  expert's gradient sums the contributions of every rank's tokens, and each rank's loss is
  a mean over its slice), clips by the norm over all ranks' experts, gathers the full state
  for checkpoints (the one-process files) and loads a checkpoint's slices.

Shape legend: N this rank's routed rows, P slots, L = P / W local slots, M rows this rank's
experts compute, D model dim, W ranks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


@dataclass(frozen=True)
class ExpertPlacement:
    n_slots: int
    world_size: int

    def __post_init__(self) -> None:
        if self.n_slots % self.world_size:
            raise ValueError(f"expert parallelism: {self.n_slots} experts do not divide over "
                             f"{self.world_size} ranks")

    @property
    def per_rank(self) -> int:
        return self.n_slots // self.world_size

    def slots(self, rank: int) -> range:
        return range(rank * self.per_rank, (rank + 1) * self.per_rank)

    def owner(self, slot: int) -> int:
        return slot // self.per_rank


@dataclass
class DispatchPlan:
    """How ``dispatch`` moved the rows (what ``combine`` reverses)."""

    order_M: torch.Tensor  # received row -> position in the local-slot order
    sent: list[int]  # rows this rank sent to each rank
    received: list[int]  # rows this rank received from each rank


class ExpertParallel:
    def __init__(self, placement: ExpertPlacement, group=None):
        self.placement, self.group = placement, group
        self.rank = dist.get_rank(group)
        if dist.get_world_size(group) != placement.world_size:
            raise ValueError(f"expert parallelism: placement for {placement.world_size} ranks, "
                             f"group of {dist.get_world_size(group)}")

    def dispatch(self, x_ND: torch.Tensor, counts_P: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """``(rows for this rank's experts sorted by local slot, their counts (L,), plan)``."""
        W, L = self.placement.world_size, self.placement.per_rank
        send_WL = counts_P.to(torch.int64).reshape(W, L).contiguous()
        recv_WL = torch.empty_like(send_WL)
        dist.all_to_all_single(recv_WL, send_WL, group=self.group)
        sent, received = send_WL.sum(1).tolist(), recv_WL.sum(1).tolist()  # the host sync
        x_MD = dist_fn.all_to_all_single(x_ND.new_empty(sum(received), x_ND.shape[1]), x_ND,
                                         received, sent, group=self.group)
        # received rows come source-major (rank s: its rows of slot 0, 1, ...): sort by slot
        slot_M = torch.repeat_interleave(torch.arange(L, device=x_ND.device).repeat(W),
                                         recv_WL.flatten().to(x_ND.device))
        order_M = torch.argsort(slot_M, stable=True)
        return x_MD[order_M], recv_WL.sum(0), DispatchPlan(order_M, sent, received)

    def combine(self, y_MD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Outputs in the local-slot order back to the ranks and rows they came from."""
        back_MD = y_MD[torch.argsort(plan.order_M)]
        return dist_fn.all_to_all_single(y_MD.new_empty(sum(plan.sent), y_MD.shape[1]),
                                         back_MD, plan.sent, plan.received, group=self.group)


class ExpertParallelExperts(nn.Module):
    """``experts`` (an ``mhc.experts.Experts``, the same on every rank) reduced to this rank's
    slots, computing every rank's rows routed to them."""

    def __init__(self, experts: nn.Module, ep: ExpertParallel):
        super().__init__()
        if experts.cfg.sharing != "none":
            raise ValueError("FFNConfig.sharing: expert parallelism places whole experts; a "
                             f"shared base (sharing={experts.cfg.sharing}) would span ranks")
        self.ep = ep
        lo, hi = ep.placement.slots(ep.rank)[0], ep.placement.slots(ep.rank)[-1] + 1
        self.local = copy.deepcopy(experts)
        for name, p in list(self.local.named_parameters(recurse=False)):
            setattr(self.local, name, nn.Parameter(p.detach()[lo:hi].clone()))
        self.local._compute_copies = {}

    def forward(self, x_ND: torch.Tensor, counts_P: torch.Tensor) -> torch.Tensor:
        x_MD, counts_L, plan = self.ep.dispatch(x_ND, counts_P)
        return self.ep.combine(self.local(x_MD, counts_L), plan)


class PlacedExperts:
    """``train.parallel=ep``: the experts of every MoE layer of ``model`` placed on the ranks
    (the rest of the model is replicated; ``sessions.distributed`` wraps it in DDP)."""

    LOCAL, FULL = ".experts.local.", ".experts."

    def __init__(self, model: nn.Module, world_size: int):
        from sessions.objectives import backbone_of

        backbone = backbone_of(model)
        if not backbone.cfg.ffn.is_moe:
            raise ValueError("TrainConfig.parallel: ep places the experts of an MoE FFN; "
                             f"model.ffn.kind={backbone.cfg.ffn.kind} has none")
        self.ep = ExpertParallel(ExpertPlacement(backbone.cfg.ffn.n_experts, world_size))
        for block in backbone.blocks:
            block.ffn.experts = ExpertParallelExperts(block.ffn.experts, self.ep)
        self.params = {n: p for n, p in model.named_parameters() if self.LOCAL in n}
        for p in self.params.values():
            p.register_post_accumulate_grad_hook(_mean_over_ranks)
        self.slots = self.ep.placement.slots(self.ep.rank)

    def full_name(self, name: str) -> str:
        return name.replace(self.LOCAL, self.FULL)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.ep.placement.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: the replicated gradients
        once, the experts of every rank."""
        params = [p for p in params if p.grad is not None]
        local = {id(p) for p in self.params.values()}

        def squares(ps):
            return torch.stack([p.grad.detach().float().pow(2).sum() for p in ps]).sum() \
                if ps else torch.zeros((), device=params[0].grad.device)

        experts = squares([p for p in params if id(p) in local])
        dist.all_reduce(experts)
        total = (squares([p for p in params if id(p) not in local]) + experts).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
        return total

    def full_state(self, model: nn.Module, optimizer) -> tuple[dict, dict]:
        """The one-process model state (names without ``local``) and optimizer state, experts
        gathered from every rank (collectives: every rank calls it)."""
        weights = {self.full_name(n): self._gather(t) if n in self.params else t
                   for n, t in model.state_dict().items()}
        state = optimizer.state_dict()
        order = [p for g in optimizer.param_groups for p in g["params"]]
        local = {id(p) for p in self.params.values()}
        for i, slots in state["state"].items():
            if id(order[i]) in local:
                state["state"][i] = {k: self._gather(v) if torch.is_tensor(v) and v.dim() else v
                                     for k, v in slots.items()}
        return weights, state

    def load(self, folder: Path, model: nn.Module, optimizer) -> int:
        """A checkpoint (saved on any world size) into this rank's slice; returns the step.
        Checked whole before anything changes (``checkpoint.plan_weights``)."""
        from sessions import checkpoint

        n, rows = self.ep.placement.n_slots, slice(self.slots.start, self.slots.stop)

        def as_saved(name: str, t: torch.Tensor):
            if name in self.params:  # this rank's rows of the full expert weight
                return self.full_name(name), (n, *t.shape[1:]), rows
            return self.full_name(name), tuple(t.shape), None

        state = model.state_dict()
        plan = checkpoint.plan_weights(folder, state, as_saved)
        plan.require_fused(folder)
        order = [p for g in optimizer.param_groups for p in g["params"]]
        local = {id(p) for p in self.params.values()}
        saved = checkpoint.fit_optimizer_state(
            folder, checkpoint.load_optimizer_state(folder), optimizer,
            [(n, *p.shape[1:]) if id(p) in local else tuple(p.shape) for p in order])
        for i, slots in saved["state"].items():
            if id(order[i]) in local:
                saved["state"][i] = {k: v[rows] if v.dim() else v for k, v in slots.items()}
        plan.load_into(state)
        optimizer.load_state_dict(saved)
        return plan.step


def _mean_over_ranks(p: torch.Tensor) -> None:
    p.grad.div_(dist.get_world_size())
