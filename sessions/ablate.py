"""The memory ablation on the cross-session recall task (``engram ablate``, the main job).

Arms, per training seed:
  * ``no-memory``        the plain mHC model (module absent), trained on the same episodes;
  * ``trained-off``      the memory model, its module present but reading nothing;
  * ``on (learned 30%)`` the memory model writing what its learned gate picks (30% budget);
  * ``on (random 30%)``  the same model writing a random 30% (the gate's baseline);
  * ``on (write all)``   the same model writing every segment.
Evaluation episodes use locker names never seen in training. Results: ``ablation.json`` and
``ablation.md`` (a table) in the output folder, and the table on stdout.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engram.config import EngramConfig
from engram.model import EngramModel
from mhc.config import RunConfig
from sessions.memory_train import (
    MemoryTrainConfig,
    answer_logits,
    evaluate_recall,
    save_memory_model,
    train_recall,
)
from sessions.tasks.recall import RecallTask
from sessions.train import lr_at, make_optimizer, pick_device


def train_no_memory(run: RunConfig, cfg: MemoryTrainConfig, steps: int,
                    progress: bool = True) -> EngramModel:
    """The module-absent arm: the same episodes' questions, no memory to read."""
    task = RecallTask(cfg.n_facts, cfg.n_distractors, split="train", seed=cfg.seed)
    device = pick_device(run.train.device)
    torch.manual_seed(cfg.seed)
    model = EngramModel(run.model, EngramConfig(enabled=False)).to(device)
    opt = make_optimizer(model, run)
    for step in tqdm(range(steps), disable=not progress, mininterval=2.0, desc="no-memory"):
        for g in opt.param_groups:
            g["lr"] = lr_at(run, step / steps, step)
        batch = task.batch(step * cfg.batch_size, cfg.batch_size)
        res = model(batch.question_BS.to(device), batch.targets_BS.to(device))
        ans = answer_logits(res.out.logits, batch)
        tgt = batch.targets_BS.gather(1, batch.answer_pos_B4).to(device)
        loss = res.out.loss + cfg.answer_weight * F.cross_entropy(
            ans.reshape(-1, ans.shape[-1]).float(), tgt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.train.grad_clip or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def run_ablation(run: RunConfig, engram_cfg: EngramConfig, cfg: MemoryTrainConfig,
                 seeds: list[int], out_dir: Path, n_eval: int = 200, eval_seeds: int = 3,
                 progress: bool = True, baseline: bool = True) -> dict:
    """``baseline=False`` skips training the module-absent arm (reported as not run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    engram_cfg = replace(engram_cfg, enabled=True, read=True)
    eval_task = RecallTask(split="eval", seed=10_000)
    results = []
    for seed in seeds:
        tcfg = replace(cfg, seed=seed)
        began = time.perf_counter()
        model = train_recall(run, engram_cfg, tcfg, progress=progress,
                             metrics_path=out_dir / f"metrics_seed{seed}.jsonl")
        train_s = time.perf_counter() - began
        row = {"seed": seed, "train_seconds": train_s, "steps": model.train_steps}
        if seed == seeds[0]:
            save_memory_model(out_dir / "checkpoint", model, run, row["steps"],
                              {"train_seconds": train_s})
        row["on (learned 30%)"] = evaluate_recall(model, eval_task, n_eval, "budget")
        row["on (random 30%)"] = [evaluate_recall(model, eval_task, n_eval, "random", seed=s)
                                  for s in range(eval_seeds)]
        row["on (write all)"] = evaluate_recall(model, eval_task, n_eval, "all")
        row["trained-off"] = evaluate_recall(model, eval_task, n_eval, read=False)
        if baseline:
            plain = train_no_memory(run, tcfg, row["steps"], progress)
            row["no-memory"] = evaluate_recall(plain, eval_task, n_eval, read=False)
        else:
            row["no-memory"] = None
        results.append(row)
        if progress:
            print(_table([row]))
    summary = {"config": {"model": asdict(run.model), "engram": asdict(engram_cfg),
                          "train": asdict(cfg)}, "seeds": results}
    (out_dir / "ablation.json").write_text(json.dumps(summary, indent=1))
    table = _table(results)
    (out_dir / "ablation.md").write_text(table + "\n")
    return {"table": table, **summary}


def _acc(value) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, list):
        return statistics.mean(v["accuracy"] for v in value)
    return value["accuracy"]


def _table(rows: list[dict]) -> str:
    arms = ["no-memory", "trained-off", "on (random 30%)", "on (learned 30%)",
            "on (write all)"]
    lines = ["| seed | steps | train s | " + " | ".join(arms) + " | gate margin |",
             "|" + "---|" * (len(arms) + 4)]
    for r in rows:
        margin = _acc(r["on (learned 30%)"]) - _acc(r["on (random 30%)"])
        lines.append(f"| {r['seed']} | {r['steps']} | {r['train_seconds']:.0f} | "
                     + " | ".join("not run" if r[a] is None else f"{_acc(r[a]):.3f}" for a in arms)
                     + f" | {margin:+.3f} |")
    return "\n".join(lines)
