"""The one training loop: backbone language modelling, memory training and every baseline arm
go through ``Trainer`` with an objective (``sessions.objectives``).

* AdamW (fused on CUDA; the experts' weights updated from their bf16 gradients with their
  bf16 compute copies written in the same kernel: ``sessions.optimizer``) with linear
  warm-up and cosine decay **by step**; a wall-clock budget (``train.max_minutes``) only
  chooses the number of steps before training starts (``plan_steps`` times a few steps on a
  throw-away copy), so the same config and seed give the same run.
* bf16 autocast on CUDA (fp32 master weights and optimizer state), gradient clipping (on
  CUDA folded into the fused AdamW step as its ``grad_scale``),
  router-bias (aux-loss-free) balancing after every optimizer step, optional
  ``torch.compile`` (``train.compile=true``); batches are pinned and copied without blocking.
  ``train.cuda_graph=true`` captures the whole step once and replays it
  (``sessions.graph_step``: CUDA, fixed batch shapes).
* No host synchronisation inside a step: losses, gradient norms, memory statistics and router
  loads are summed on the device and read every ``log_every`` steps into ``metrics.jsonl``.
* Checkpoints (``checkpoint/``, atomic) every ``checkpoint_every`` steps and at the end; a
  resumed run continues exactly (batches are a function of (seed, step)).
* Under ``torchrun`` (``WORLD_SIZE`` > 1) ``sessions.distributed`` wraps the model (DDP, or
  FSDP2 with ``train.parallel=fsdp``), gives each rank its slice of every global batch and
  sums router loads over the ranks; rank 0 alone logs, shows progress and writes. With
  ``WORLD_SIZE`` unset none of it runs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mhc import compute_copies
from mhc.config import TrainConfig
from mhc.moe import FFNAux
from mhc.stats import layer_stats, summarize
from sessions import checkpoint, distributed
from sessions.objectives import backbone_of, move
from sessions.optimizer import make_optimizer


@dataclass
class TrainResult:
    step: int
    train_seconds: float
    val: dict
    last_loss: float
    out_dir: Path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is available")
    return torch.device(name)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(t: TrainConfig, step: int) -> float:
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, step / max(1, t.steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


class Trainer:
    def __init__(self, model: torch.nn.Module, objective, train: TrainConfig, out_dir: Path,
                 config: dict, kind: str = "backbone", progress: bool = True,
                 desc: str = "train"):
        """``config``: the run's plain config, saved beside every checkpoint."""
        self.train, self.objective, self.out_dir = train, objective, Path(out_dir)
        self.config, self.kind, self.desc = config, kind, desc
        if train.threads:
            torch.set_num_threads(train.threads)
        self.dist = distributed.setup()  # one process: rank 0 of 1, and nothing else changes
        self.progress = progress and self.dist.is_main
        self.device = distributed.train_device(self.dist, pick_device(train.device))
        self.model = model.to(self.device)
        self.step_model = torch.compile(self.model) if train.compile else self.model
        self.parallel = None  # several ranks: DDP or FSDP2 (which shards: before the optimizer)
        if self.dist.enabled:
            self.parallel = distributed.DataParallel(self.dist, self.model, objective, train,
                                                     self.step_model, self.device)
        # the experts' bf16 copies owned by the optimizer (sessions.optimizer): not under
        # DDP/FSDP (they reduce parameters' gradients), and only for one forward a step
        # (several reads would sum their gradients in bf16)
        self.expert_copies = train.expert_copies and self.device.type == "cuda" and \
            self.parallel is None and getattr(objective, "one_forward", False)
        self.optimizer = make_optimizer(self.model, train, self.device, self.expert_copies)
        # Clipping folded into the fused AdamW step: it divides each gradient by
        # ``grad_scale`` as it reads it (the hook AMP's GradScaler uses), which saves the
        # separate pass that rescales every gradient in place (read + write, 8 B/param).
        self.clip_in_optimizer = bool(train.grad_clip) and self.parallel is None and \
            self.optimizer.defaults.get("fused", False)
        if self.clip_in_optimizer:
            self.optimizer.grad_scale = torch.ones((), device=self.device)
        self.graph = None  # train.cuda_graph: the step captured once, replayed
        if train.cuda_graph:
            from sessions.graph_step import GraphStep

            self.graph = GraphStep(self)

    # ---- one step ----------------------------------------------------------------------
    def _step(self, step: int):
        if self.expert_copies:  # masters changed since (a load): re-cast, outside any graph
            compute_copies.refresh(self.optimizer.copy_masters())
        if self.graph is not None:
            return self.graph.step(step)
        lr = lr_at(self.train, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = move(self.objective.batch(step), self.device, non_blocking=True)
        return (*self._compute(batch), lr)

    def _compute(self, batch):
        """Forward, backward, clip, optimizer step, router biases: ``(out, grad norm)``
        (what ``sessions.graph_step`` captures)."""
        t = self.train
        with autocast(self.device):
            out = self.objective.loss(self.step_model, batch) if self.parallel is None else \
                self.parallel.loss(batch)
        out.loss.backward()
        if self.clip_in_optimizer:  # implies t.grad_clip
            grad_norm = self.optimizer.grad_norm()  # the experts' copies' gradients included
            # = 1 / clip_grad_norm_'s clamped coefficient max_norm / (norm + 1e-6)
            self.optimizer.grad_scale.copy_(((grad_norm + 1e-6) / t.grad_clip).clamp_min(1.0))
        elif t.grad_clip:
            params = self.model.parameters()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip) \
                if self.parallel is None else self.parallel.clip_grad_norm(params, t.grad_clip)
        else:
            grad_norm = torch.zeros((), device=self.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        backbone_of(self.model).update_router_biases(out.layers)
        return out, grad_norm

    # ---- the loop ----------------------------------------------------------------------
    def fit(self, resume: Path | None = None) -> TrainResult:
        t = self.train
        main = self.dist.is_main  # the one writer of a distributed job
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        if resume is not None:
            start = self.load(resume)
        metrics_path = self.out_dir / "metrics.jsonl"
        if main:
            _keep_rows_up_to(metrics_path, start)  # a resumed run rewrites what came after
        end = min(t.steps, t.stop_after) if t.stop_after else t.steps
        reduce = self.parallel.mean_over_ranks if self.parallel is not None else None
        acc = _Window(self.device, reduce) if self.graph is None else self.graph.window()
        began = time.perf_counter()
        last_loss, val = float("nan"), {}
        self.model.train()
        with (metrics_path.open("a") if main else open(os.devnull, "w")) as metrics, tqdm(
                total=t.steps, initial=start, disable=not self.progress, mininterval=2.0,
                dynamic_ncols=True, desc=self.desc) as bar:
            for step in range(start, end):
                out, grad_norm, lr = self._step(step)
                acc.add(out, grad_norm)
                done = step + 1
                if done % t.log_every == 0 or done == end:
                    row = acc.read(done, lr, time.perf_counter() - began)
                    last_loss = row["loss"]
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{row['loss']:.3f}",
                                    tok_s=f"{row['tokens_per_s']:,.0f}", lr=f"{lr:.1e}")
                bar.update(1)
                if done % t.eval_every == 0 and done != end:
                    val = self._validate()
                    metrics.write(json.dumps({"step": done, "val": val}) + "\n")
                    if main:
                        bar.write(f"step {done}: "
                                  + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
                if done % t.checkpoint_every == 0 and done != end:
                    self.save(done)
            train_seconds = time.perf_counter() - began
            val = self._validate()
            self.save(end, {"val": val, "train_seconds": train_seconds})
            metrics.write(json.dumps({"step": end, "val": val, "final": True,
                                      "train_seconds": train_seconds}) + "\n")
        return TrainResult(end, train_seconds, val, last_loss, self.out_dir)

    def _validate(self) -> dict:
        was = self.model.training
        self.model.eval()
        try:
            if self.parallel is not None:
                return self.parallel.validate(self.device, autocast(self.device))
            return self.objective.validate(self.model, self.device, autocast(self.device))
        finally:
            self.model.train(was)

    def save(self, step: int, extra: dict | None = None) -> Path:
        if self.parallel is not None:  # the full state, written by rank 0
            return self.parallel.save(self.out_dir / "checkpoint", self.optimizer, self.config,
                                      step, extra, self.kind)
        return checkpoint.save(self.out_dir / "checkpoint", self.model, self.optimizer,
                               self.config, step, extra, kind=self.kind)

    def load(self, folder: Path) -> int:
        """Weights and optimizer state of a checkpoint (saved on any world size); the step."""
        if self.parallel is not None:
            return self.parallel.load(folder, self.optimizer)
        return checkpoint.load(folder, self.model, self.optimizer)


class _Window:
    """Sums of a logging window's step statistics, kept on the device until read."""

    def __init__(self, device, reduce=None):
        """``reduce(sums, tokens)``: the window over every rank (``DataParallel``)."""
        self.device, self.reduce = device, reduce
        self._reset()

    def _reset(self):
        self.n, self.tokens, self.t0 = 0, 0, time.perf_counter()
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _sum(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        self.sums[name] = self.sums[name] + v if name in self.sums else v.clone()

    def add(self, out, grad_norm) -> None:
        self.n += 1
        self.tokens += out.tokens
        for name, value in [("loss", out.lm_loss), ("router_loss", out.router_loss),
                            ("grad_norm", grad_norm), *out.extras.items()]:
            self._sum(name, value)
        moe = [a for a in out.layers if a.counts_E is not None]
        if moe:
            new = [(a.counts_E, a.domain_counts_G) for a in moe]
            self.counts = new if self.counts is None else [
                (c + nc, d + nd) for (c, d), (nc, nd) in zip(self.counts, new, strict=True)]

    def read(self, step: int, lr: float, elapsed: float) -> dict:
        """The window's means as a metrics row (the one host synchronisation)."""
        now = time.perf_counter()
        sums, tokens = self.sums, self.tokens
        if self.reduce is not None:  # counts are global already (summed in the forward)
            sums, tokens = self.reduce(sums, tokens)
        row = {"step": step, **{k: float(v) / self.n for k, v in sums.items()},
               "lr": lr, "tokens_per_s": tokens / max(now - self.t0, 1e-9),
               "elapsed_s": elapsed}
        if self.counts is not None:
            zero = torch.zeros(())
            row.update(summarize(layer_stats([FFNAux(zero, zero, c, d) for c, d in self.counts])))
        self._reset()
        return row


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop metrics rows after ``step`` (and all of them for a fresh run)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step] if step else []
    path.write_text("".join(r + "\n" for r in rows))


def plan_steps(model: torch.nn.Module, objective, train: TrainConfig, n: int = 3) -> TrainConfig:
    """With ``max_minutes`` > 0: time ``n`` steps (after two warm-up steps) on a copy of the model
    and set ``steps`` to what fits the budget; the copy is thrown away, so training itself
    depends only on the resulting step count (under torchrun: the ranks time their steps
    together and all take rank 0's count)."""
    if not train.max_minutes:
        return train
    probe = Trainer(copy.deepcopy(model), objective, replace(train, compile=False),
                    Path("."), {}, progress=False)
    # to the replays: the step graph's warm-up, and the episode write pass's capture (its
    # batch shape's second sighting)
    warm = 2 + (probe.graph.WARMUP if probe.graph is not None else 0)
    for i in range(warm):
        probe._step(i)
    if probe.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    for i in range(n):
        probe._step(warm + i)
    if probe.device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - began) / n
    steps = distributed.broadcast_int(max(1, int(train.max_minutes * 60 / per_step)))
    return replace(train, steps=steps, max_minutes=0.0)
