"""The whole training step captured once in a CUDA graph and replayed (``train.cuda_graph``).

An eager step of an MoE model is host-bound (hundreds of small launches: the hierarchical
``small`` step ran 59 ms compiled on 20 ms of GPU work). Replaying one captured graph runs
the same kernels with no per-step host work. What is captured is ``Trainer._compute`` —
bf16 autocast forward, backward, clipping, fused AdamW, zero grads, router-bias update —
plus the window's statistics, summed in place into static device tensors.

* Inputs: the batch is copied into static device buffers (from pinned memory, without
  blocking); the learning rate is a device tensor filled before each replay, so the schedule
  still changes per step; AdamW runs with ``capturable=True`` (its step count on the device).
* The first ``WARMUP`` steps run eagerly on a side stream (lazy initialisation, Triton JIT,
  optimizer state), then step ``start + WARMUP`` is captured and every step from there on is
  a replay. Warm-up steps are real training steps: the run equals an eager run.
* The garbage collector is paused during the capture (collected just before): freeing a
  dead graph in the middle of a capture invalidates it.
* Fixed shapes only: a CPU device, an objective whose batches change shape (episodes), or a
  batch whose shape differs from the captured one is a ``ValueError`` naming the cause.
* Checkpoints: the optimizer's state dict stores the learning rate as a number, and loading
  one (saved with or without this option) restores the device tensor and ``capturable``.
* The experts' bf16 compute copies: with ``train.expert_copies`` (the default) the captured
  AdamW step writes them (``sessions.optimizer``) and the forward reads them; without it
  they are cast inside the graph on every replay and, after a replay, the copies cached for
  eager use (validation) are marked stale.
"""

from __future__ import annotations

import torch

from mhc import compute_copies
from sessions.graph_write import capture
from sessions.trainer import _Window, lr_at

STATIC_OBJECTIVES = ("lm",)  # objectives (by name) whose batches have fixed shapes


class GraphStep:
    WARMUP = 2  # eager steps before the capture

    def __init__(self, trainer):
        name = getattr(trainer.objective, "name", type(trainer.objective).__name__)
        if name not in STATIC_OBJECTIVES:
            raise ValueError(
                f"train.cuda_graph=true is unsupported for the {name!r} objective: its batches "
                "change shape from step to step (episodes differ in sessions, segments and "
                "probes) and a CUDA graph replays fixed shapes; train without train.cuda_graph")
        device = trainer.device
        if device.type != "cuda":
            raise ValueError(f"train.cuda_graph=true needs a CUDA GPU; this run trains on "
                             f"{device.type} (train.device={trainer.train.device})")
        self.trainer, self.device = trainer, device
        # warm-up and capture on one side stream: autograd's gradient accumulators keep the
        # stream they were made on, and a mismatch would make backward synchronize streams
        self.side = torch.cuda.Stream(device)
        self.lr = make_capturable(trainer.optimizer, trainer.train.lr, device)
        self.stats = _StaticStats()
        self.batch = None  # static device copy of the batch, made at the first step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured = None  # (StepOutput, grad norm) of the captured step (static tensors)
        self.eager_steps = self.replays = 0

    def window(self) -> _Window:
        return _GraphWindow(self.device, self.stats)

    def step(self, step: int):
        """Training step ``step``: copy its batch in, set the learning rate, run eagerly
        (warm-up) or replay the graph. Returns ``(StepOutput, grad norm, lr)`` like
        ``Trainer._step``."""
        lr = lr_at(self.trainer.train, step)
        self._load(self.trainer.objective.batch(step), step)
        self.lr.fill_(lr)
        if self.graph is None and self.eager_steps < self.WARMUP:
            self.eager_steps += 1
            return (*self._on_side_stream(self._body), lr)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.replays += 1
        compute_copies.invalidate()  # the replayed AdamW step ran no Python hook
        return (*self.captured, lr)

    # ---- pieces ----------------------------------------------------------------------------
    def _body(self):
        out, grad_norm = self.trainer._compute(self.batch)
        self.stats.add_(out, grad_norm)
        return out, grad_norm

    def _on_side_stream(self, fn):
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            result = fn()
        torch.cuda.current_stream(self.device).wait_stream(self.side)
        return result

    def _capture(self) -> None:
        if self.stats.sums is None:  # WARMUP = 0: allocate the sums outside the graph
            raise RuntimeError("GraphStep: at least one eager warm-up step is needed")
        self.trainer.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        self.captured = capture(graph, self._body, self.side)  # the collector paused
        self.graph = graph

    def _load(self, host, step: int) -> None:
        """Copy batch ``host`` (a dataclass of CPU tensors) into the static buffers."""
        fields = vars(host)
        if self.batch is None:
            for name, value in fields.items():
                if not torch.is_tensor(value):
                    raise ValueError(f"train.cuda_graph: batch field {name!r} is not a tensor "
                                     f"({type(value).__name__}); a CUDA graph replays tensors")
            self.batch = type(host)(**{n: torch.empty(v.shape, dtype=v.dtype, device=self.device)
                                       for n, v in fields.items()})
        for name, value in fields.items():
            dst = getattr(self.batch, name, None)
            if dst is None or value.shape != dst.shape or value.dtype != dst.dtype:
                raise ValueError(
                    f"train.cuda_graph: batch field {name!r} of step {step} is "
                    f"{tuple(value.shape)} {value.dtype}, the captured step was made for "
                    f"{tuple(dst.shape) if dst is not None else None}; a CUDA graph replays "
                    "fixed shapes")
            staged = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            staged.copy_(value)  # the caching host allocator keeps it until the copy ran
            dst.copy_(staged, non_blocking=True)


class _StaticStats:
    """The logging window's sums as static device tensors, added to in place (inside the
    graph on every replay) and zeroed after each read."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] | None = None
        self.counts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add_(self, out, grad_norm) -> None:
        values = {"loss": out.lm_loss, "router_loss": out.router_loss, "grad_norm": grad_norm,
                  **out.extras}
        counts = [(a.counts_E, a.domain_counts_G) for a in out.layers if a.counts_E is not None]
        if self.sums is None:
            self.sums = {k: torch.zeros((), device=v.device) for k, v in values.items()}
            self.counts = [(torch.zeros_like(c), torch.zeros_like(d)) for c, d in counts]
        for name, value in values.items():
            self.sums[name].add_(value.detach().float())
        for (c, d), (nc, nd) in zip(self.counts, counts, strict=True):
            c.add_(nc)
            d.add_(nd)

    def zero_(self) -> None:
        torch._foreach_zero_([*self.sums.values(), *(t for pair in self.counts for t in pair)])


class _GraphWindow(_Window):
    """The trainer's logging window over ``_StaticStats``: steps and tokens are counted on
    the host, the sums are the graph's; ``read`` is the same (one sync per window)."""

    def __init__(self, device, stats: _StaticStats):
        self.stats = stats
        super().__init__(device)

    def add(self, out, grad_norm) -> None:
        self.n += 1
        self.tokens += out.tokens

    def read(self, step: int, lr: float, elapsed: float) -> dict:
        self.sums, self.counts = dict(self.stats.sums), list(self.stats.counts) or None
        row = super().read(step, lr, elapsed)
        self.stats.zero_()
        return row


def make_capturable(optimizer: torch.optim.Optimizer, lr: float,
                    device: torch.device) -> torch.Tensor:
    """Turn a fresh fused AdamW into one a CUDA graph can replay with a changing learning
    rate: ``capturable=True`` and every group's ``lr`` one shared device tensor (returned).
    State dicts keep the learning rate as a number (checkpoints are JSON + safetensors);
    loading one restores the tensor and the flag."""
    lr_t = torch.tensor(float(lr), device=device)

    def attach(groups) -> None:
        for group in groups:
            if torch.is_tensor(group["lr"]):
                lr_t.copy_(group["lr"])
            else:
                lr_t.fill_(float(group["lr"]))
            group["lr"], group["capturable"] = lr_t, True

    def to_numbers(_opt, state: dict) -> dict:
        for group in state["param_groups"]:
            if torch.is_tensor(group["lr"]):
                group["lr"] = float(group["lr"])  # a sync, at checkpoint time only
        return state

    optimizer.defaults["capturable"] = True
    optimizer._warned_capturable_if_run_uncaptured = True  # warm-up steps run uncaptured
    attach(optimizer.param_groups)
    optimizer.register_state_dict_post_hook(to_numbers)
    optimizer.register_load_state_dict_post_hook(lambda opt: attach(opt.param_groups))
    return lr_t
