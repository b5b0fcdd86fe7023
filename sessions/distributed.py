"""Data-parallel and sharded training on ``torch.distributed``, launched by ``torchrun``.

With ``WORLD_SIZE`` unset (or 1) nothing here runs: the trainer takes its one-process path
unchanged. Under ``torchrun --nproc_per_node=N [--nnodes ...] $(command -v engram) train ...``:

* **Process group** (``setup``): the ``env://`` rendezvous torchrun prepares; gloo for CPU
  tensors and, on a machine with GPUs, NCCL for CUDA tensors (``cpu:gloo,cuda:nccl``); rank r
  trains on ``cuda:LOCAL_RANK``.
* **Data** (``Shard``): every rank makes the same global batch (a pure function of the seed and
  the step) and keeps its slice: rows ``r·B/N .. (r+1)·B/N`` of a text batch, the same range
  of whole episodes of an episode batch. A global batch is the one-process batch.
* **Gradients** (``DataParallel``): ``train.parallel=ddp`` (default) replicates the model and
  averages gradients (DDP); ``fsdp`` shards parameters, gradients and optimizer state per
  block (FSDP2 ``fully_shard``) and reduce-scatters averaged gradients; ``ep`` places every
  MoE layer's experts on the ranks (``sessions.expert_parallel``, all-to-all dispatch and
  combine) and replicates the rest under DDP. Each rank's loss is the mean over its slice,
  so for the text objective the averaged gradient is the one-process gradient up to float
  summation order.
* **Router loads**: in a training step's forward every MoE layer sums its expert counts over
  the ranks (``mhc.moe`` counts hook, one all-reduce of E integers per layer), so the
  load-balance loss, the logged load statistics and the bias-balancing updates all see the
  global batch's load, as in one process; the biases stay identical on every rank.
* **Statistics**: a logging window's sums are averaged over the ranks when read (one small
  all-reduce every ``log_every`` steps); rank 0 alone writes metrics, progress bars, the run
  folder and checkpoints (stdout of the other ranks is silenced).
* **Checkpoints**: the full state in the one-process files (``sessions.checkpoint``): DDP saves
  rank 0's replica; FSDP gathers the full state to rank 0 (DCP ``get_*_state_dict``), EP
  all-gathers the experts. Loading works on any world size: DDP ranks each read the files,
  FSDP reads them on rank 0 and broadcasts (``set_*_state_dict``), EP ranks read their
  experts' slices.
"""

from __future__ import annotations

import atexit
import copy
import inspect
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mhc import moe


@dataclass(frozen=True)
class Context:
    """Where this process sits in the job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> Context:
    """Join the process group torchrun describes (once; later calls return the context)."""
    if not launched():
        return Context()
    if not dist.is_initialized():
        for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {name} is not "
                                   "set: launch several processes with torchrun")
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend)
        atexit.register(_teardown)
    return context()


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """Leave the process group together (after training), so that rank 0 can go on alone
    (evaluation) with no communicator open while the other ranks exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def context() -> Context:
    if not dist.is_initialized():
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(),
                   int(os.environ.get("LOCAL_RANK", "0")), str(dist.get_backend()))


def is_main() -> bool:
    """Rank 0, or a single process (known from the launcher's environment before joining)."""
    return int(os.environ.get("RANK", "0")) == 0


def silence_other_ranks() -> None:
    """Ranks other than 0 print nothing to stdout (results and progress come from rank 0;
    warnings and errors still reach stderr)."""
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. prepares a data cache), the others after it."""
    if not dist.is_initialized():
        yield
        return
    if not is_main():
        dist.barrier()
    yield
    if is_main():
        dist.barrier()


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, 0)
    return int(t)


def train_device(ctx: Context, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA training."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


# ---- data ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s equal slice of every global batch."""

    rank: int
    world_size: int

    def bounds(self, n: int) -> tuple[int, int]:
        if n % self.world_size:
            raise ValueError(f"TrainConfig.batch_size: {n} is not divisible by the world size "
                             f"{self.world_size} (every rank takes an equal slice of the "
                             "global batch)")
        per = n // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def rows(self, batch):
        """A batch dataclass whose tensors all have the batch first: this rank's rows."""
        values = {f.name: getattr(batch, f.name) for f in fields(batch)}
        n = next(v.shape[0] for v in values.values() if torch.is_tensor(v))
        lo, hi = self.bounds(n)
        return replace(batch, **{k: v[lo:hi] for k, v in values.items() if torch.is_tensor(v)})

    def episodes(self, eps: list, chosen: set | None) -> tuple[list, set | None]:
        """This rank's episodes of a global episode batch, and the probes chosen for them
        (``chosen``: ``(row, session, index)`` over the global batch, or None for all).

        Every rank must run the same forwards (the counts all-reduce is a collective), so a
        batch whose slices differ in having probes or context is an error, the same on
        every rank."""
        bounds = [Shard(r, self.world_size).bounds(len(eps)) for r in range(self.world_size)]

        def shape(lo: int, hi: int) -> tuple[bool, bool]:
            probes = any(lo <= b < hi for b, _, _ in chosen) if chosen is not None else any(
                s.probes for e in eps[lo:hi] for s in e.sessions)
            return probes, any(s.context for e in eps[lo:hi] for s in e.sessions)

        shapes = {shape(lo, hi) for lo, hi in bounds}
        if len(shapes) > 1:
            raise ValueError(
                "the ranks' slices of a training batch differ: some have probes (or context "
                "segments) and others none, so the ranks would run different forwards; use "
                "episodes that all have probes and context, or fewer ranks")
        lo, hi = bounds[self.rank]
        if chosen is not None:
            chosen = {(b - lo, s, i) for b, s, i in chosen if lo <= b < hi}
        return eps[lo:hi], chosen


# ---- the trainer's distributed half ----------------------------------------------------------
class StepModule(nn.Module):
    """The objective's loss as one module's forward, which DDP and FSDP wrap: every model
    call of a step (several for episodes: traces, probes, context) happens inside it, so
    FSDP gathers the root's parameters around all of them."""

    def __init__(self, model: nn.Module, objective, step_model):
        super().__init__()
        self.model, self.objective = model, objective
        self._call = [step_model]  # the compiled view, not registered a second time

    def forward(self, batch, validate=None):
        if validate is not None:
            return self.objective.validate(self.model, *validate)
        out = self.objective.loss(self._call[0], batch)
        return out.loss, out  # the loss where DDP looks for tensors


@torch.compiler.disable
def _sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    total = counts.clone()  # the layer still dispatches its own tokens with its local counts
    dist.all_reduce(total)
    return total


def _average_grad(p: torch.Tensor) -> None:
    dist.all_reduce(p.grad)
    p.grad.div_(dist.get_world_size())


@contextmanager
def global_counts():
    """MoE layers called inside see the expert counts summed over the ranks."""
    previous = moe.set_counts_reducer(_sum_over_ranks)
    try:
        yield
    finally:
        moe.set_counts_reducer(previous)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class DataParallel:
    """DDP, FSDP2 or DDP with placed experts around a trainer's model and objective
    (``sessions.trainer`` uses it when the job has several ranks)."""

    def __init__(self, ctx: Context, model: nn.Module, objective, train, step_model,
                 device: torch.device):
        from sessions.objectives import backbone_of

        if train.cuda_graph:
            raise ValueError("TrainConfig.cuda_graph: a captured step is single-process; "
                             f"this job has {ctx.world_size} ranks (train without it)")
        if train.compile and train.parallel != "ddp":
            raise ValueError(f"TrainConfig.compile: not supported with train.parallel="
                             f"{train.parallel} yet (use ddp, or train without compile)")
        if not hasattr(objective, "shard"):
            raise TypeError(f"{type(objective).__name__} cannot shard its batches over ranks "
                            "(it has no `shard` attribute)")
        self.ctx, self.model, self.mode = ctx, model, train.parallel
        Shard(ctx.rank, ctx.world_size).bounds(train.batch_size)  # fail before anything runs
        objective.shard = Shard(ctx.rank, ctx.world_size)
        # fsdp, ep: rank 0 keeps a full copy on the CPU, which checkpoints gather into
        self.shadow = copy.deepcopy(model).cpu() if ctx.is_main and self.mode != "ddp" else None
        self.placed = None
        if self.mode == "ep":
            from sessions.expert_parallel import PlacedExperts

            self.placed = PlacedExperts(model, ctx.world_size)
        module = StepModule(model, objective, step_model)
        if self.mode in ("ddp", "ep"):
            from torch.nn.parallel import DistributedDataParallel

            # biases move identically on every rank (global counts): no buffer broadcasts
            # (the keyword's newer name where torch has it); episode steps may leave a
            # module unused (a batch without probes or context)
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
                DistributedDataParallel).parameters else "broadcast_buffers"
            if self.placed is not None:  # each rank's own experts: not all-reduced
                DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                    module, [f"model.{n}" for n in self.placed.params])
            self.wrapped = DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True, **{no_sync: False},
                find_unused_parameters=getattr(objective, "name", "") != "lm")
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (ctx.world_size,))
            # FSDP cannot shard 0-d parameters (Engram's scales and gates): they stay
            # replicated and their gradients are averaged as they arrive
            scalars = {p for p in module.parameters() if p.dim() == 0}
            for p in scalars:
                p.register_post_accumulate_grad_hook(_average_grad)
            for block in backbone_of(model).blocks:
                fully_shard(block, mesh=mesh, ignored_params=scalars or None)
            # the root: everything outside the blocks
            fully_shard(module, mesh=mesh, ignored_params=scalars or None)
            self.wrapped = module

    def loss(self, batch):
        with global_counts():
            loss, out = self.wrapped(batch)
        return replace(out, loss=loss)

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """The gradient norm over the whole model, clipped to ``max_norm``."""
        if self.placed is not None:
            return self.placed.clip_grad_norm(params, max_norm)
        return full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))

    @torch.no_grad()
    def validate(self, device, autocast) -> dict:
        """Validation runs whole on every rank (the same numbers everywhere); FSDP and EP
        need every rank in every forward."""
        if self.mode != "fsdp":
            return self.wrapped.module.objective.validate(self.model, device, autocast)
        return self.wrapped(None, validate=(device, autocast))

    def mean_over_ranks(self, sums: dict[str, torch.Tensor], tokens: int
                        ) -> tuple[dict[str, torch.Tensor], int]:
        """A window's sums averaged over the ranks, its tokens summed (one all-reduce)."""
        names = sorted(sums)
        device = sums[names[0]].device
        vec = torch.stack([sums[k].double().reshape(()) for k in names]
                          + [torch.tensor(float(tokens), dtype=torch.float64, device=device)])
        dist.all_reduce(vec)
        vec[:-1] /= self.ctx.world_size
        return {k: vec[i] for i, k in enumerate(names)}, int(vec[-1])

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, folder: Path, optimizer, config: dict, step: int, extra: dict | None,
             kind: str) -> Path:
        from sessions import checkpoint

        extra = {**(extra or {}), "world_size": self.ctx.world_size, "parallel": self.mode}
        if self.mode == "ddp":
            if self.ctx.is_main:
                checkpoint.save(folder, self.model, optimizer, config, step, extra, kind)
            return Path(folder)
        if self.mode == "ep":
            weights, state = self.placed.full_state(self.model, optimizer)  # every rank
            if self.ctx.is_main:
                self.shadow.load_state_dict(weights)
                checkpoint.save(folder, self.shadow, state, config, step, extra, kind)
            return Path(folder)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)  # collectives: every rank
        optim_sd = get_optimizer_state_dict(self.model, optimizer, options=opts)
        if self.ctx.is_main:
            self.shadow.load_state_dict(model_sd)
            checkpoint.save(folder, self.shadow, _by_index(optim_sd), config, step, extra,
                            kind)
        return Path(folder)

    def load(self, folder: Path, optimizer) -> int:
        from sessions import checkpoint

        if self.mode == "ddp":
            return checkpoint.load(folder, self.model, optimizer)
        if self.mode == "ep":
            return self.placed.load(folder, self.model, optimizer)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_sd, optim_sd, step = {}, {}, 0
        if self.ctx.is_main:
            step = checkpoint.load(folder, self.shadow)
            model_sd = self.shadow.state_dict()
            optim_sd = _by_name(checkpoint.load_optimizer_state(folder), self.model, optimizer)
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, model_sd, options=opts)
        set_optimizer_state_dict(self.model, optimizer, optim_sd, options=opts)
        return broadcast_int(step)

    def plain_model(self) -> nn.Module | None:
        """The trained model as one process holds it (rank 0; FSDP, EP: the copy the last
        checkpoint filled); None on the other ranks of an FSDP or EP job."""
        return self.model if self.mode == "ddp" else self.shadow


def _by_index(optim_sd: dict) -> dict:
    """DCP's optimizer state (keyed by parameter name) in ``torch.optim``'s own layout
    (parameters numbered in group order), which the checkpoint files store."""
    index, groups = {}, []
    for g in optim_sd["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in g["params"]]
        groups.append({**g, "params": ids})
    return {"state": {index[name]: s for name, s in optim_sd["state"].items()},
            "param_groups": groups}


def _by_name(state: dict, model: nn.Module, optimizer) -> dict:
    """``torch.optim``'s layout keyed by the names of ``optimizer``'s parameters in
    ``model`` (what DCP loads)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(state["param_groups"]) != len(optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"])
            for a, b in zip(state["param_groups"], optimizer.param_groups, strict=True)):
        from sessions.checkpoint import CheckpointError

        raise CheckpointError("the checkpoint's optimizer groups do not match this model's")
    return {"state": {order[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]}
                             for g in state["param_groups"]]}
