"""Expert parallelism: the experts of an MoE layer placed on the ranks, each routed row sent
to the rank that owns its expert and its output sent back (all-to-all).

Built and tested on gloo (CPU); not yet a ``train.parallel`` mode (docs/distributed.md says
what wiring it into the trainer takes).

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

Gradients: a local expert's gradient sums the contributions of every rank's tokens; under
data parallelism (each rank's loss a mean over its slice) divide it by W, and leave expert
parameters out of the data-parallel all-reduce.

Shape legend: N this rank's routed rows, P slots, L = P / W local slots, M rows this rank's
experts compute, D model dim, W ranks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

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
