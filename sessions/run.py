"""``engram run EXPERIMENT.yaml``: train (or load) a model, then evaluate it on the
experiment's episodes through the real trace store, and write the whole run folder
(``sessions.runs``): config, env, metrics, checkpoint, one folder per evaluated arm (its
store, probes, sessions, retrievals), ``summary.json``, ``report.md`` and plots.

The arm is the experiment's memory setting (``engram.enabled``/``read``, or ``--memory`` /
``ENGRAM_ENABLED``); a memory-on run also scores the same model with its reads off
(``eval.compare_off``), which is the per-session on-vs-off comparison of the report.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from engram.model import EngramModel
from sessions import checkpoint as checkpoints
from sessions import distributed, report
from sessions.experiment import ExperimentConfig, to_plain
from sessions.pipeline import (
    arm_folder,
    evaluate_arm,
    evaluation_episodes,
    load_model,
    train_model,
)
from sessions.runner import Arm
from sessions.runs import read_jsonl, start_run, write_json
from sessions.tasks import task_spec


def _check_resumable(out_dir: Path, plain: dict) -> None:
    saved = out_dir / "config.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) != plain:
        raise ValueError(f"{out_dir} was started with another config (see its config.yaml): "
                         "resume with the same command, or choose a new --out")


def model_for(exp: ExperimentConfig, out_dir: Path, checkpoint: Path | None, progress: bool,
              resume: bool) -> tuple[EngramModel, dict]:
    """The model ``exp``'s arm evaluates: trained here, or loaded from ``checkpoint``."""
    if checkpoint is None:
        return train_model(exp, "off" if exp.memory == "off" else "on", out_dir, progress,
                           resume)
    model, trained = load_model(checkpoint)
    if exp.memory != "off" and not model.memory_enabled:
        raise ValueError(f"{checkpoint}: a model without the memory module cannot run the "
                         f"{exp.memory!r} arm")
    if exp.memory == "off" and model.memory_enabled:  # the module absent: the backbone alone
        plain = EngramModel(trained.model, replace(model.cfg, enabled=False))
        plain.backbone.load_state_dict(model.backbone.state_dict())
        model = plain
    return model, {"steps": trained.train.steps, "seed": trained.train.seed,
                   "checkpoint_task": trained.task}


def training_seed(exp: ExperimentConfig, checkpoint: Path | None) -> int:
    """The seed the evaluated model was trained with (``--checkpoint``: that run's)."""
    if checkpoint is None:
        return exp.train.seed
    return int(checkpoints.read_info(checkpoint)["config"]["train"]["seed"])


def run_experiment(exp: ExperimentConfig, out_dir: Path, checkpoint: Path | None = None,
                   progress: bool = True, resume: bool = False) -> dict | None:
    out_dir = Path(out_dir)
    plain = to_plain(exp)
    if resume:
        _check_resumable(out_dir, plain)
    if not (resume and (out_dir / "env.json").exists()):
        start_run(out_dir, plain, seeds=[training_seed(exp, checkpoint)])
    episodes = evaluation_episodes(exp)  # checked before training or writing anything
    model, trained = model_for(exp, out_dir, checkpoint, progress, resume)
    distributed.finish()  # torchrun: every rank trained; rank 0 alone evaluates and writes
    if not distributed.is_main():
        return None
    arms = [exp.memory] + (["trained-off"] if exp.memory == "on" and exp.eval.compare_off
                           else [])
    summaries = {a: evaluate_arm(model, Arm.parse(a), exp, episodes, out_dir / arm_folder(a),
                                 progress, resume) for a in arms}
    summary = {"experiment": exp.name, "task": task_spec(exp.make_task("eval")),
               "seed": trained.get("seed", exp.train.seed), "steps": trained["steps"],
               "episodes": len(episodes), "arms": summaries}
    if exp.eval.episodes_file:
        summary["episodes_file"] = Path(exp.eval.episodes_file).name
    write_json(out_dir / "summary.json", summary)
    write_report(out_dir, summary)
    return summary


def write_report(out_dir: Path, summary: dict) -> Path:
    arms = summary["arms"]
    plots = []
    metrics = read_jsonl(out_dir / "metrics.jsonl")
    if metrics:
        plots.append(report.plot_training({"model": metrics}, out_dir / "training.png"))
    if any(s.get("by_session") for s in arms.values()):
        plots.append(report.plot_by({a: [s] for a, s in arms.items()}, "by_session",
                                    out_dir / "accuracy_by_session.png", "session"))
    lines = [f"# {summary['experiment']}: {summary['episodes']} evaluation episodes",
             "", f"Task: `{summary['task']}`; training seed {summary['seed']}, "
             f"{summary['steps']} steps.", "", "## Exact match by session", "",
             report.arms_table(arms), ""]
    for tag in sorted({t for s in arms.values() for t in s.get("by_tag", {})}):
        lines += [f"## By `{tag}`", "", report.tag_table(arms, tag), ""]
        if tag == "distance":
            plots.append(report.plot_by({a: [s] for a, s in arms.items()}, "distance",
                                        out_dir / "accuracy_by_distance.png",
                                        "sessions between fact and question"))
    extra, extra_plots = report.task_sections(arms, {a: out_dir / arm_folder(a) for a in arms},
                                              out_dir)
    lines += extra
    plots += extra_plots
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def one_line(summary: dict) -> str:
    parts = [f"{a} {s.get('exact_match', float('nan')):.3f}" for a, s in summary["arms"].items()]
    return (f"{summary['experiment']}: exact match " + ", ".join(parts)
            + f" ({summary['episodes']} episodes, {summary['steps']} training steps)")

