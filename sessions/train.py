"""Training loop for the mHC backbone (``engram train``).

AdamW with linear warm-up and cosine decay, gradient clipping, bf16 autocast on GPU,
safetensors checkpoints, exact resume (batches are a function of (seed, step); optimizer state
and router biases are saved), a progress bar with loss and tokens/s, metrics as JSON lines.

With ``train.max_minutes > 0`` the schedule follows whichever is further along, the step count
or the wall-clock budget, so the learning rate has decayed when the budget runs out (such runs
are not bit-reproducible; ``max_minutes=0`` runs are).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mhc import params
from mhc.config import RunConfig
from mhc.model import MHCModel
from mhc.stats import layer_stats, summarize
from sessions import checkpoint
from sessions.data import DOMAINS, Sampler, build_streams, eval_batches


@dataclass
class TrainResult:
    step: int
    train_seconds: float
    val: dict  # stream name -> validation loss (nats per byte)
    last_loss: float
    out_dir: Path

    @property
    def val_loss(self) -> float:
        return self.val.get("shakespeare", next(iter(self.val.values())))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is available")
    return torch.device(name)


def lr_at(run: RunConfig, progress: float, step: int) -> float:
    t = run.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, run: RunConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": run.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=run.train.lr, betas=(run.train.beta1, run.train.beta2))


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: MHCModel, batches_by_stream: dict, device: torch.device) -> dict:
    """Mean next-byte loss (nats per byte) on fixed validation windows, per stream."""
    was_training = model.training
    model.eval()
    out = {}
    for name, batches in batches_by_stream.items():
        total = 0.0
        for b in batches:
            with autocast(device):
                res = model(b.x.to(device), b.y.to(device))
            total += float(res.lm_loss)
        out[name] = total / len(batches)
    model.train(was_training)
    return out


def train(
    run: RunConfig,
    resume: Path | None = None,
    progress: bool = True,
    cache_dir: Path = Path("cache"),
) -> TrainResult:
    t = run.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    out_dir = Path(t.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_streams, val_streams = build_streams(t.data, cache_dir, seed=t.seed, quiet=not progress)
    sampler = Sampler(train_streams, t.batch_size, run.model.seq_len, t.seed)
    val_sets = {
        DOMAINS[s.domain]: eval_batches(s, t.batch_size, run.model.seq_len, t.eval_batches)
        for s in val_streams
    }

    torch.manual_seed(t.seed)
    model = MHCModel(run.model).to(device)
    optimizer = make_optimizer(model, run)
    start = 0
    if resume is not None:
        start = checkpoint.load(resume, model, optimizer)
    count = params.count(run.model)
    if progress:
        print(
            f"model: {run.model.ffn.kind} ffn, {count.total:,} parameters, "
            f"{count.active:,} active per token; device {device}"
        )
    metrics = (out_dir / "metrics.jsonl").open("a" if resume is not None else "w")
    tokens_per_step = t.batch_size * run.model.seq_len
    bar = tqdm(
        total=t.steps,
        initial=start,
        disable=not progress,
        mininterval=2.0,
        dynamic_ncols=True,
        desc="train",
    )
    began, last_loss, step, val = time.perf_counter(), float("nan"), start, {}
    window_t, window_steps = time.perf_counter(), 0
    model.train()
    end = min(t.steps, t.stop_after) if t.stop_after else t.steps
    for step in range(start, end):
        elapsed = time.perf_counter() - began
        if t.max_minutes and elapsed >= t.max_minutes * 60:
            break
        frac = max(step / t.steps, elapsed / (t.max_minutes * 60) if t.max_minutes else 0.0)
        lr = lr_at(run, frac, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sampler.batch(step)
        with autocast(device):
            out = model(batch.x.to(device), batch.y.to(device), batch.domains.to(device))
        out.loss.backward()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            if t.grad_clip
            else torch.tensor(0.0)
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_router_biases(out.layers)
        last_loss = float(out.lm_loss.detach())
        window_steps += 1
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            now = time.perf_counter()
            tok_s = window_steps * tokens_per_step / max(now - window_t, 1e-9)
            window_t, window_steps = now, 0
            row = {
                "step": done,
                "loss": last_loss,
                "router_loss": float(out.router_loss.detach()),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tok_s,
                "elapsed_s": now - began,
                **summarize(layer_stats(out.layers)),
            }
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.1e}")
        bar.update(1)
        if done % t.eval_every == 0 and done != t.steps:
            val = evaluate(model, val_sets, device)
            metrics.write(json.dumps({"step": done, "val": val}) + "\n")
            bar.write(f"step {done}: val " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
        if done % t.checkpoint_every == 0:
            checkpoint.save(out_dir / "checkpoint", model, optimizer, run, done)
        step = done
    bar.close()
    train_seconds = time.perf_counter() - began
    val = evaluate(model, val_sets, device)
    checkpoint.save(
        out_dir / "checkpoint",
        model,
        optimizer,
        run,
        step,
        {"val": val, "train_seconds": train_seconds},
    )
    metrics.write(
        json.dumps({"step": step, "val": val, "final": True, "train_seconds": train_seconds}) + "\n"
    )
    metrics.close()
    return TrainResult(step, train_seconds, val, last_loss, out_dir)
