"""``engram ablate EXPERIMENT.yaml``: the memory ablation, arms × training seeds.

For each seed: the memory model is trained once (with reads on) and evaluated as every arm
that has the module (``trained-off``, ``on``, ``on:<write policy>``); the ``off`` arm is the
plain mHC model (module absent) trained on the same episodes with the same trainer, steps and
seed. Every arm evaluates the same episodes (the evaluation seed does not change with the
training seed). Output, in the ablation folder:

    ablation.json   the resolved config, one row per (seed, arm) with the seed it ran with,
                    and mean ± std over seeds per arm and metric
    ablation.md     the table (mean ± std), per-distance and per-session tables
    ablation.png    bars with error bars; accuracy_by_session.png, accuracy_by_distance.png,
                    training.png
    seed<N>/memory/, seed<N>/no-memory/   run folders of the trained models
    seed<N>/<arm>/  one evaluation each (probes, retrievals, store/, summary.json)
"""

from __future__ import annotations

from pathlib import Path

from sessions import report
from sessions.experiment import ExperimentConfig, parse_arm, to_plain, with_seed
from sessions.pipeline import arm_folder, evaluate_arm, evaluation_episodes, train_model
from sessions.runner import Arm
from sessions.runs import read_jsonl, start_run, write_json

METRICS = ("exact_match", "answer_bits_per_byte")


def run_ablation(exp: ExperimentConfig, out_dir: Path, progress: bool = True,
                 resume: bool = False) -> dict:
    out_dir = Path(out_dir)
    arms, seeds = list(exp.ablate.arms), list(exp.ablate.seeds)
    start_run(out_dir, to_plain(exp), seeds=seeds)
    episodes = evaluation_episodes(exp)
    rows, curves = [], {}
    for seed in seeds:
        exp_s = with_seed(exp, seed)
        base = out_dir / f"seed{seed}"
        models = {}
        if any(parse_arm(a)[0] != "off" for a in arms):
            models["memory"] = train_model(exp_s, "on", base / "memory", progress, resume,
                                           desc=f"seed {seed}: memory")
        if "off" in arms:
            models["no-memory"] = train_model(exp_s, "off", base / "no-memory", progress,
                                              resume, desc=f"seed {seed}: no memory")
        for name in models:
            curves[f"{name} (seed {seed})"] = read_jsonl(base / name / "metrics.jsonl")
        for a in arms:
            arm = Arm.parse(a)
            model, info = models["no-memory" if arm.memory == "off" else "memory"]
            summary = evaluate_arm(model, arm, exp_s, episodes, base / arm_folder(a), progress,
                                   resume)
            rows.append({"seed": seed, "steps": info["steps"], **summary})
        if progress:
            print(table([r for r in rows if r["seed"] == seed]))
    result = {"config": to_plain(exp), "episodes": len(episodes), "rows": rows,
              "mean": aggregate(rows, arms)}
    write_json(out_dir / "ablation.json", result)
    write_outputs(out_dir, result, curves)
    return result


def aggregate(rows: list[dict], arms: list[str]) -> dict:
    out = {}
    for a in arms:
        mine = [r for r in rows if r["arm"] == a]
        out[a] = {}
        for m in METRICS:
            values = [r[m] for r in mine if m in r]
            mean, std = report.mean_std(values)
            out[a][m] = {"mean": round(mean, 6), "std": round(std, 6), "n": len(values)}
    return out


def table(rows: list[dict]) -> str:
    """Mean ± std over the rows' seeds, one line per arm."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    agg = aggregate(rows, arms)
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"| arm | exact match (mean ± std, seeds {', '.join(map(str, seeds))}) | "
             "answer bits/byte | traces written |", "|---|---|---|---|"]
    if not any("exact_match" in r for r in rows):  # a task measured on its context
        lines = [f"| arm | context bits/byte (mean ± std, seeds {', '.join(map(str, seeds))}) | "
                 "traces written | memory bytes |", "|---|---|---|---|"]
    for a in arms:
        mine = [r for r in rows if r["arm"] == a]
        written = sum(r["written"]["traces"] for r in mine) / len(mine)
        if "exact_match" not in agg[a] or not agg[a]["exact_match"]["n"]:
            bpb, std = report.mean_std([r["context_bits_per_byte"]["all"] for r in mine
                                        if "context_bits_per_byte" in r])
            size = sum(r.get("memory", {}).get("bytes", 0) for r in mine) / len(mine)
            lines.append(f"| {a} | {bpb:.4f} ± {std:.4f} | {written:.0f} | {size:,.0f} |")
            continue
        em, bits = agg[a]["exact_match"], agg[a]["answer_bits_per_byte"]
        lines.append(f"| {a} | {em['mean']:.3f} ± {em['std']:.3f} | {bits['mean']:.3f} ± "
                     f"{bits['std']:.3f} | {written:.0f} |")
    return "\n".join(lines)


def write_outputs(out_dir: Path, result: dict, curves: dict) -> None:
    rows = result["rows"]
    arms = list(result["mean"])
    by_arm = {a: [r for r in rows if r["arm"] == a] for a in arms}
    if all("exact_match" in r for r in rows):
        report.plot_ablation({a: [r["exact_match"] for r in rs] for a, rs in by_arm.items()},
                             out_dir / "ablation.png")
    elif all("context_bits_per_byte" in r for r in rows):  # tasks measured on their context
        report.plot_ablation({a: [r["context_bits_per_byte"]["all"] for r in rs]
                              for a, rs in by_arm.items()}, out_dir / "ablation.png",
                             "context bits/byte")
    if any(r.get("by_session") for r in rows):
        report.plot_by(by_arm, "by_session", out_dir / "accuracy_by_session.png", "session")
    tags = sorted({t for r in rows for t in r.get("by_tag", {})})
    if "distance" in tags:
        report.plot_by(by_arm, "distance", out_dir / "accuracy_by_distance.png",
                       "sessions between fact and question")
    if any(curves.values()):
        report.plot_training(curves, out_dir / "training.png")
    lines = [f"# Memory ablation: {result['config']['name']}", "",
             f"{result['episodes']} evaluation episodes per arm; seeds "
             f"{sorted({r['seed'] for r in rows})}.", "", table(rows), ""]
    for seed in sorted({r["seed"] for r in rows}):
        lines += [f"## Seed {seed}: exact match by session", "",
                  report.arms_table({r["arm"]: r for r in rows if r["seed"] == seed}), ""]
        for tag in tags:
            lines += [f"### Seed {seed}: by `{tag}`", "",
                      report.tag_table({r["arm"]: r for r in rows if r["seed"] == seed}, tag),
                      ""]
        mine = {r["arm"]: r for r in rows if r["seed"] == seed}
        extra, _ = report.task_sections(mine, {a: out_dir / f"seed{seed}" / arm_folder(a)
                                               for a in mine}, out_dir, f"Seed {seed}: ")
        lines += extra
    (out_dir / "ablation.md").write_text("\n".join(lines) + "\n")
