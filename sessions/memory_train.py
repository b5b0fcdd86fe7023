"""Training and evaluating Engram on multi-session episodes (the recall task).

One training step: encode every session-1 segment of a batch of episodes into traces
(differentiable), hold them in a ``TensorMemory`` (one namespace per batch row), run the
session-2 question reading from that memory, and minimise the language-model loss on the
question (plus an extra term on the answer digits) and the write-gate budget loss. During
training every segment is written softly (its values enter the read scaled by σ(s)); at
evaluation the write policy decides hard: the learned gate under a 30% budget, a random 30%,
everything, or nothing read at all.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engram.backends import TensorMemory
from engram.config import EngramConfig
from engram.model import EngramModel
from engram.write import select
from mhc.config import RunConfig
from sessions.tasks.recall import RecallBatch, RecallTask
from sessions.train import lr_at, make_optimizer, pick_device


@dataclass
class MemoryTrainConfig:
    steps: int = 800
    batch_size: int = 8
    answer_weight: float = 1.0
    max_minutes: float = 0.0
    log_every: int = 25
    seed: int = 0
    n_facts: int = 3
    n_distractors: int = 4  # evaluation uses RecallTask's default (7): a 30% budget = facts
    retrieve_all: bool = True  # train reading every trace; the retrieval bias still learns
    write_backprop: bool = False  # backprop through the backbone's write pass (3x the cost)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"MemoryTrainConfig.{name}: must be >= 1")


def build_memory(model: EngramModel, batch: RecallBatch, policy: str = "all",
                 generator: torch.Generator | None = None,
                 backbone_grad: bool = False) -> TensorMemory:
    """Encode the session-1 segments and write them (by ``policy``) into a TensorMemory.
    Without ``backbone_grad`` the backbone's write pass runs without autograd; the writer
    (pooling, keys, salience) and the readers' projections still get gradients."""
    B, N, S = batch.write_BNS.shape
    device = next(model.parameters()).device
    traces = model.encode_traces(batch.write_BNS.reshape(B * N, S).to(device),
                                 backbone_grad=backbone_grad)
    sal_BN = traces.salience_N.view(B, N)
    keep = None
    if policy != "all":
        keep = torch.stack([select(sal_BN[b], model.cfg, policy, generator) for b in range(B)])
    mem = TensorMemory(B, traces.hidden_NSD.shape[-1], model.cfg.key_dim,
                       traces.hidden_NSD.shape[1], device, traces.hidden_NSD.dtype)
    hidden = traces.hidden_NSD
    mem.write(traces.key_NK.view(B, N, -1), hidden.view(B, N, *hidden.shape[1:]),
              traces.mask_NS.view(B, N, -1), traces.tokens_NS.view(B, N, -1), sal_BN, session=0,
              keep_Bn=keep)
    return mem


def answer_logits(logits_BSV: torch.Tensor, batch: RecallBatch) -> torch.Tensor:
    pos = batch.answer_pos_B4.to(logits_BSV.device)
    return logits_BSV.gather(1, pos[:, :, None].expand(-1, -1, logits_BSV.shape[-1]))


def step_loss(model: EngramModel, batch: RecallBatch, cfg: MemoryTrainConfig):
    device = next(model.parameters()).device
    mem = build_memory(model, batch, "all", backbone_grad=cfg.write_backprop)
    k = mem.size if cfg.retrieve_all else None
    res = model(batch.question_BS.to(device), batch.targets_BS.to(device), memory=mem, session=1,
                top_k=k)
    ans = answer_logits(res.out.logits, batch)
    tgt = batch.targets_BS.gather(1, batch.answer_pos_B4).to(device)
    answer_loss = F.cross_entropy(ans.reshape(-1, ans.shape[-1]).float(), tgt.reshape(-1))
    loss = res.out.loss + cfg.answer_weight * answer_loss
    loss = loss + model.writer.salience_loss(mem.salience_BM)
    return loss, answer_loss, res


def train_recall(run: RunConfig, engram_cfg: EngramConfig, cfg: MemoryTrainConfig,
                 task: RecallTask | None = None, progress: bool = True,
                 metrics_path: Path | None = None) -> EngramModel:
    """Train the backbone and the memory together on recall episodes."""
    if not engram_cfg.enabled:
        raise ValueError("train_recall needs EngramConfig.enabled=True")
    task = task or RecallTask(cfg.n_facts, cfg.n_distractors, split="train", seed=cfg.seed)
    device = pick_device(run.train.device)
    if run.train.threads:
        torch.set_num_threads(run.train.threads)
    torch.manual_seed(cfg.seed)
    model = EngramModel(run.model, engram_cfg).to(device)
    opt = make_optimizer(model, run)
    metrics = metrics_path.open("w") if metrics_path else None
    bar = tqdm(total=cfg.steps, disable=not progress, mininterval=2.0, desc="recall")
    began = time.perf_counter()
    done = 0
    for step in range(cfg.steps):
        elapsed = time.perf_counter() - began
        if cfg.max_minutes and elapsed > cfg.max_minutes * 60:
            break
        done = step + 1
        frac = max(step / cfg.steps, elapsed / (cfg.max_minutes * 60) if cfg.max_minutes else 0)
        lr = lr_at(run, frac, step)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = task.batch(step * cfg.batch_size, cfg.batch_size)
        loss, answer_loss, res = step_loss(model, batch, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.grad_clip or math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        if (step + 1) % cfg.log_every == 0:
            read = next(iter(res.reads.values()))
            row = {"step": step + 1, "loss": float(loss.detach()), "lr": lr,
                   "answer_loss": float(answer_loss.detach()), "gate": read.gate,
                   "memory_mass": read.memory_mass, "hits": read.hits,
                   "elapsed_s": time.perf_counter() - began}
            bar.set_postfix(loss=f"{row['loss']:.3f}", answer=f"{row['answer_loss']:.3f}")
            if metrics:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
    bar.close()
    model.train_seconds = time.perf_counter() - began
    model.train_steps = done
    return model


@torch.no_grad()
def evaluate_recall(model: EngramModel, task: RecallTask, n_episodes: int = 200,
                    policy: str = "budget", read: bool = True, batch_size: int = 25,
                    seed: int = 0) -> dict:
    """Exact-match accuracy (all 4 digits right under teacher forcing, which equals greedy
    decoding of the 4 digits) and how often the asked fact was written."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    correct, written, total = 0, 0, 0
    for start in range(0, n_episodes, batch_size):
        batch = task.batch(start, min(batch_size, n_episodes - start))
        mem = build_memory(model, batch, policy, gen) if read else None
        res = model(batch.question_BS.to(device), memory=mem, session=1)
        pred = answer_logits(res.out.logits, batch).argmax(-1).cpu()
        tgt = batch.targets_BS.gather(1, batch.answer_pos_B4)
        correct += int((pred == tgt).all(-1).sum())
        if mem is not None:
            written += int((mem.valid_BM.cpu() & batch.asked_BN).any(-1).sum())
        total += pred.shape[0]
    model.train(was)
    return {"accuracy": correct / total, "asked_fact_written": written / total if read else 0.0,
            "episodes": total, "policy": policy if read else "none", "read": read}


def save_memory_model(folder: Path, model: EngramModel, run: RunConfig, step: int,
                      extra: dict | None = None) -> Path:
    """A checkpoint folder like ``engram train``'s, with the Engram config beside the run's."""
    from dataclasses import asdict

    from sessions import checkpoint

    return checkpoint.save(folder, model, None, run, step,
                           {"engram": asdict(model.cfg), **(extra or {})})


def load_memory_model(folder: Path, device: str = "cpu") -> tuple[EngramModel, RunConfig]:
    from sessions import checkpoint

    info = checkpoint.read_info(folder)
    if "engram" not in info:
        raise checkpoint.CheckpointError(f"{folder}: not an Engram checkpoint (no engram config)")
    run = checkpoint.load_run_config(folder)
    model = EngramModel(run.model, EngramConfig(**info["engram"])).to(device)
    checkpoint.load(folder, model)
    return model, run


def model_version(model: EngramModel) -> str:
    """A short content hash of the weights that make traces (backbone + writer): traces made
    by different weights have different versions."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("backbone.", "writer.")):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]
