"""The steps every experiment command shares: make or load a model, train it with the one
trainer (resumable), pick the evaluation episodes, evaluate one arm with the one runner.

``engram run`` (``sessions.run``), ``engram ablate`` (``sessions.ablate``) and ``engram
train EXPERIMENT`` are compositions of these functions; none has a loop of its own.
Under ``torchrun`` every rank trains (``sessions.distributed``) and rank 0 alone writes the
run folder; evaluation (``evaluate_arm``) is rank 0's: one writer per trace store.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from engram.model import EngramModel
from sessions import checkpoint, distributed
from sessions.encoding import encode_probes, encode_segments
from sessions.episodes import Episode, read_episodes
from sessions.experiment import ExperimentConfig, from_plain, to_plain
from sessions.objectives import EpisodeObjective
from sessions.report import summarize
from sessions.runner import Arm, Runner
from sessions.runs import start_run, write_json
from sessions.trainer import Trainer, TrainResult, pick_device, plan_steps


def train_backbone(run, resume: Path | None = None, progress: bool = True,
                   cache_dir: Path = Path("cache")) -> TrainResult:
    """``engram train CONFIG``: the backbone alone, next-byte prediction on text streams,
    into ``run.train.out_dir``."""
    from mhc import presets
    from mhc.model import MHCModel
    from sessions.objectives import LMObjective

    distributed.setup()
    with distributed.main_first():  # rank 0 prepares the data cache, the others read it
        objective = LMObjective(run, cache_dir, quiet=not progress)
    torch.manual_seed(run.train.seed)
    model = MHCModel(run.model)
    if resume is None:
        run = replace(run, train=plan_steps(model, objective, run.train))
    trainer = Trainer(model, objective, run.train, Path(run.train.out_dir),
                      presets.to_plain(run), progress=progress)
    if resume is None:  # the run folder once the trainer has accepted the config
        start_run(Path(run.train.out_dir), presets.to_plain(run), seeds=[run.train.seed])
    return trainer.fit(resume=resume)


def build_model(exp: ExperimentConfig, memory: str) -> EngramModel:
    """A fresh model for an arm: the memory module present unless ``memory == "off"``
    (then the model *is* the plain mHC model). Seeded by ``train.seed``."""
    torch.manual_seed(exp.train.seed)
    return EngramModel(exp.model, replace(exp.engram, enabled=memory != "off", read=True))


def load_model(folder: Path) -> tuple[EngramModel, ExperimentConfig]:
    """A model trained on episodes, and the experiment config it was trained with."""
    exp = checkpoint.load_experiment_config(folder)
    model = EngramModel(exp.model, replace(exp.engram, read=True))
    checkpoint.load(folder, model)
    return model, exp


def train_model(exp: ExperimentConfig, memory: str, out_dir: Path, progress: bool = True,
                resume: bool = False, desc: str = "train") -> tuple[EngramModel, dict]:
    """Train (or, with ``resume``, finish or reuse) the model of ``memory``'s arm in
    ``out_dir``; returns it with ``{"steps", "train_seconds"}``."""
    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint"
    model = build_model(exp, memory)
    objective = EpisodeObjective(exp, exp.train.seed, exp.objective.probes_per_episode)
    train_cfg = exp.train
    if resume and (ckpt / "config.json").is_file():
        info = checkpoint.read_info(ckpt)
        # the saved plan (steps chosen by a budget stay chosen); this call's stop_after
        train_cfg = replace(from_plain(info["config"]).train, stop_after=exp.train.stop_after)
        if info["step"] >= train_cfg.steps:  # finished: reuse it
            checkpoint.load(ckpt, model)
            return model.to(pick_device(exp.train.device)), {
                "steps": info["step"], "train_seconds": info.get("train_seconds")}
    else:
        resume = False
        train_cfg = plan_steps(model, objective, exp.train)
    plain = to_plain(replace(exp, train=train_cfg, engram=model.cfg))
    trainer = Trainer(model, objective, train_cfg, out_dir, plain, kind="experiment",
                      progress=progress, desc=desc)
    result = trainer.fit(resume=ckpt if resume else None)
    model = trainer.model if trainer.parallel is None else trainer.parallel.plain_model()
    return model, {"steps": result.step, "train_seconds": result.train_seconds}


def evaluation_episodes(exp: ExperimentConfig) -> list[Episode]:
    """The episodes an evaluation runs: ``eval.episodes_file``, or ``eval.episodes`` of the
    task's eval split. Each is checked against the model's window before anything runs."""
    if exp.eval.episodes_file:
        eps = read_episodes(exp.eval.episodes_file)
        if exp.eval.episodes:
            eps = eps[:exp.eval.episodes]
    else:
        task = exp.make_task("eval")
        n = exp.eval.episodes or (task.count("eval") if hasattr(task, "count") else 0)
        if not n:
            raise ValueError("eval.episodes: how many evaluation episodes (0 needs a file)")
        eps = [task.episode("eval", exp.eval.seed, i) for i in range(n)]
    for ep in eps:  # fail here, not half-way through a store
        encode_probes([ep], None, exp.model.seq_len)
        encode_segments([ep], list(range(len(ep.sessions))), exp.model.seq_len)
    return eps


def arm_folder(name: str) -> str:
    return name.replace(":", "-")


def evaluate_arm(model: EngramModel, arm: Arm, exp: ExperimentConfig, episodes: list[Episode],
                 arm_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Run ``episodes`` through ``model`` as ``arm``; returns (and saves) the arm's summary."""
    device = pick_device(exp.train.device)
    runner = Runner(model.to(device), arm, exp, arm_dir, device, progress)
    runner.run(episodes, resume=resume)
    summary = {"arm": arm.name, **summarize(arm_dir)}
    write_json(Path(arm_dir) / "summary.json", summary)
    return summary
