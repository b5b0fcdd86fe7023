"""The ``engram`` command line: the platform's one entry point.

    engram run EXPERIMENT.yaml [key=value ...]     train (or load) a model, evaluate its
                                                   episodes through the trace store
    engram ablate EXPERIMENT.yaml --arms ... --seeds ...   the memory ablation
    engram train CONFIG|EXPERIMENT [key=value ...] train only (text streams or episodes)
    engram eval CHECKPOINT                         validation loss of a backbone checkpoint
    engram params CONFIG|EXPERIMENT [key=value ...] total / active parameter accounting
    engram data prepare | episodes                 data sets into the cache; a task's
                                                   episodes as JSONL
    engram traces ... (--store DIR | --run RUN)    ingest / query / list / show / export /
                                                   stats / verify / delete / reindex traces
    engram bench architectures [--preset cpu|gpu]  the FFN kinds side by side, the source
                                                   report's claims measured

The memory flag: ``--memory on|off|trained-off`` wins over ``ENGRAM_ENABLED=1|0``, which wins
over the config (``engram.enabled``; off by default), for every command that builds a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RAW = argparse.RawDescriptionHelpFormatter
MAIN_EPILOG = """examples:
  engram run configs/experiments/smoke.yaml                  # the whole pipeline in a minute
  engram ablate configs/experiments/recall5.yaml --seeds 0 1 2
  engram run configs/experiments/recall5.yaml --episodes my_episodes.jsonl
  engram traces query --run runs/smoke "locker code" -k 5
  engram train tiny model.ffn.kind=flat_moe train.steps=500   # the backbone on Shakespeare
Every command has --help with its own examples.
"""


def _memory_flag(p) -> None:
    p.add_argument("--memory", choices=["on", "off", "trained-off"], default=None,
                   help="on: read memory; trained-off: module present, reads off; off: module "
                   "absent (default: ENGRAM_ENABLED, else the config's engram.enabled)")


def _common(p, out_help: str) -> None:
    p.add_argument("--out", type=Path, help=out_help)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _experiment(args, overrides: list[str] | None = None):
    """The experiment of ``args.config`` with overrides and the memory flag resolved."""
    from dataclasses import replace

    from engram.config import resolve
    from sessions.experiment import load_experiment

    exp = load_experiment(args.config, overrides if overrides is not None else args.overrides)
    return replace(exp, engram=resolve(exp.engram, getattr(args, "memory", None)))


# ---- run ---------------------------------------------------------------------------------
def _add_run(sub) -> None:
    p = sub.add_parser("run", help="train (or load) a model and evaluate an experiment",
                       formatter_class=RAW, description=(
        "Train the experiment's model with the one trainer (or load --checkpoint), then run "
        "the evaluation episodes session by session through the real trace store (LMDB + "
        "FAISS): every session reads the traces of earlier sessions and writes its own. "
        "Writes the run folder OUT (default runs/<name>): config.yaml, env.json, "
        "metrics.jsonl, checkpoint/, <arm>/{store/,probes.jsonl,retrievals.jsonl,"
        "sessions.jsonl,summary.json}, summary.json, report.md, PNG plots."),
        epilog="""examples:
  engram run configs/experiments/smoke.yaml
  engram run configs/experiments/recall5.yaml train.steps=300 eval.episodes=50 --out runs/r5
  engram run configs/experiments/recall5.yaml --checkpoint runs/r5/checkpoint \\
      --episodes examples/episodes.jsonl --out runs/mine
  ENGRAM_ENABLED=0 engram run configs/experiments/recall2.yaml     # the no-memory arm
  engram run configs/experiments/smoke.yaml --resume               # continue a killed run
""")
    p.add_argument("config", help="experiment YAML (configs/experiments/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=100 task.n_sessions=3")
    p.add_argument("--episodes", help="JSONL episodes to evaluate (same as eval.episodes_file=)")
    p.add_argument("--checkpoint", type=Path, help="evaluate this trained model, train nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT (finished parts are kept)")
    p.add_argument("--json", action="store_true", help="print summary.json")
    _memory_flag(p)
    _common(p, "run folder (default runs/<experiment name>)")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from sessions.run import one_line, run_experiment

    overrides = list(args.overrides) + ([f"eval.episodes_file={args.episodes}"]
                                        if args.episodes else [])
    exp = _experiment(args, overrides)
    out = args.out or Path("runs") / exp.name
    summary = run_experiment(exp, out, args.checkpoint, progress=not args.quiet,
                             resume=args.resume)
    if summary is None:  # torchrun: another rank evaluates and writes the run folder
        return 0
    print(json.dumps(summary, indent=1) if args.json else one_line(summary))
    print(f"run folder: {out} (report.md, summary.json)")
    return 0


# ---- ablate ------------------------------------------------------------------------------
def _add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="the memory ablation: arms x training seeds",
                       formatter_class=RAW, description=(
        "For each training seed, train the memory model once and evaluate it as every arm "
        "with the module (trained-off, on, on:<write policy>), and train the plain mHC model "
        "(module absent) on the same episodes for the 'off' arm; every arm evaluates the same "
        "episodes through the trace store. Prints mean ± std over seeds; writes "
        "OUT/ablation.json (a row per seed and arm), ablation.md and ablation.png."),
        epilog="""examples:
  engram ablate configs/experiments/recall5.yaml
  engram ablate configs/experiments/recall5.yaml --seeds 0 1 2 --out runs/recall5-3seeds
  engram ablate configs/experiments/recall2.yaml --arms off on on:random train.steps=400
arms: off | trained-off | on | on:budget | on:random | on:all | on:threshold
""")
    p.add_argument("config", help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("--arms", nargs="+", help="arms (default: the config's ablate.arms)")
    p.add_argument("--seeds", type=int, nargs="+", help="training seeds (default ablate.seeds)")
    p.add_argument("--resume", action="store_true", help="reuse finished models and arms")
    _common(p, "ablation folder (default runs/<name>-ablate)")
    p.set_defaults(func=_cmd_ablate)


def _cmd_ablate(args) -> int:
    from engram.config import env_enabled
    from sessions.ablate import run_ablation, table

    if _world_size() > 1:
        raise ValueError("engram ablate runs in one process; under torchrun, train and "
                         "evaluate each arm with engram run (docs/distributed.md)")
    overrides = list(args.overrides)
    if args.arms:
        overrides.append(f"ablate.arms=[{','.join(args.arms)}]")
    if args.seeds is not None:
        overrides.append(f"ablate.seeds=[{','.join(map(str, args.seeds))}]")
    exp = _experiment(args, overrides)
    if not env_enabled(True):  # ENGRAM_ENABLED=0: only the arm without the module
        from dataclasses import replace

        print("ENGRAM_ENABLED=0: running the 'off' arm only", file=sys.stderr)
        exp = replace(exp, ablate=replace(exp.ablate, arms=["off"]))
    out = args.out or Path("runs") / f"{exp.name}-ablate"
    result = run_ablation(exp, out, progress=not args.quiet, resume=args.resume)
    print(table(result["rows"]))
    print(f"results: {out / 'ablation.json'}, {out / 'ablation.md'}; plot: {out / 'ablation.png'}")
    return 0


# ---- train / eval / params ---------------------------------------------------------------
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (text streams or an experiment's episodes)",
                       formatter_class=RAW, description=(
        "CONFIG is a preset (tiny, small, debug) or a YAML like configs/tiny.yaml: the "
        "backbone learns next-byte prediction on text streams (train.data). An experiment "
        "YAML trains the experiment's model on its task's episodes instead (memory per "
        "--memory / ENGRAM_ENABLED / engram.enabled). Writes OUT/metrics.jsonl and "
        "OUT/checkpoint/ (model.safetensors, optimizer.safetensors, config.json)."),
        epilog="""examples:
  engram train tiny                                   # the tiny preset on this machine
  engram train configs/tiny.yaml model.ffn.kind=progressive train.max_minutes=5
  engram train tiny --resume runs/tiny/checkpoint train.steps=4000
  engram train configs/experiments/recall5.yaml --out runs/recall5-model
  torchrun --nproc_per_node=2 $(command -v engram) train debug   # DDP (train.parallel=fsdp)
""")
    p.add_argument("config", help="preset name, YAML config or experiment YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--resume", type=Path, help="checkpoint folder to continue from (text "
                   "streams: its saved config is used, with the overrides applied on top)")
    p.add_argument("--cache", type=Path, default=Path("cache"), help="data cache folder")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    _memory_flag(p)
    _common(p, "output folder (default train.out_dir, or runs/<experiment name>)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from sessions.experiment import is_experiment_file

    if is_experiment_file(args.config):
        return _train_experiment(args)
    from engram.config import EngramConfig, resolve

    if resolve(EngramConfig(), args.memory).enabled:
        raise ValueError("memory is on (--memory / ENGRAM_ENABLED), but text-stream training "
                         "has no sessions to remember: train an experiment instead "
                         "(engram train configs/experiments/recall5.yaml)")
    from mhc import presets
    from sessions import checkpoint
    from sessions.pipeline import train_backbone

    overrides = list(args.overrides) + ([f"train.out_dir={args.out}"] if args.out else [])
    if args.resume:
        base = presets.to_plain(checkpoint.load_run_config(args.resume))
        run = presets.build(presets.apply_overrides(base, overrides))
    else:
        run = presets.load(args.config, overrides)
    _print_params(run.model, args.quiet)
    result = train_backbone(run, args.resume, progress=not args.quiet, cache_dir=args.cache)
    summary = {"ffn": run.model.ffn.kind, "steps": result.step,
               "train_seconds": round(result.train_seconds, 1), "val": result.val,
               "checkpoint": str(result.out_dir / "checkpoint")}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"done: {result.step} steps in {result.train_seconds:.0f} s; validation loss "
              + ", ".join(f"{k} {v:.3f}" for k, v in result.val.items())
              + f" nats/byte; checkpoint {summary['checkpoint']}")
    return 0


def _print_params(model_cfg, quiet: bool) -> None:
    if quiet:
        return
    from mhc import params

    c = params.count(model_cfg)
    print(f"model: {model_cfg.ffn.kind} ffn, {c.total:,} parameters, {c.active:,} active/token")


def _train_experiment(args) -> int:
    from sessions.experiment import to_plain
    from sessions.pipeline import train_model
    from sessions.runs import start_run

    exp = _experiment(args)
    resume = args.resume
    if resume is not None:  # the run folder of a checkpoint folder
        resume = resume.parent if resume.name == "checkpoint" else resume
    out = args.out or resume or Path("runs") / exp.name
    if resume is None:
        start_run(out, to_plain(exp), seeds=[exp.train.seed])
    _print_params(exp.model, args.quiet)
    _, info = train_model(exp, "off" if exp.memory == "off" else "on", out,
                          progress=not args.quiet, resume=resume is not None)
    summary = {"experiment": exp.name, "memory": exp.memory, **info,
               "checkpoint": str(out / "checkpoint")}
    print(json.dumps(summary) if args.json else
          f"done: {info['steps']} steps; checkpoint {summary['checkpoint']}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss of a backbone checkpoint",
                       formatter_class=RAW, epilog="example:\n  engram eval runs/tiny/checkpoint\n"
                       "(a model trained on episodes: engram run EXPERIMENT --checkpoint DIR)")
    p.add_argument("checkpoint", type=Path, help="checkpoint folder")
    p.add_argument("--cache", type=Path, default=Path("cache"))
    _memory_flag(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from engram.config import EngramConfig, resolve
    from mhc.model import MHCModel
    from sessions import checkpoint
    from sessions.objectives import LMObjective
    from sessions.trainer import autocast, pick_device

    info = checkpoint.read_info(args.checkpoint)
    if info.get("kind") == "experiment":
        raise ValueError(f"{args.checkpoint} was trained on episodes: evaluate it with "
                         "engram run EXPERIMENT.yaml --checkpoint DIR")
    if resolve(EngramConfig(), args.memory).enabled:
        raise ValueError("a backbone checkpoint has no memory module (--memory / ENGRAM_ENABLED)")
    run = checkpoint.load_run_config(args.checkpoint)
    device = pick_device(run.train.device)
    model = MHCModel(run.model).to(device)
    checkpoint.load(args.checkpoint, model)
    model.eval()
    val = LMObjective(run, args.cache, quiet=True).validate(model, device, autocast(device))
    print(json.dumps(val))
    return 0


def _add_params(sub) -> None:
    p = sub.add_parser("params", help="parameter accounting (total and active per token)",
                       formatter_class=RAW, epilog="examples:\n  engram params tiny "
                       "model.ffn.sharing=base\n  engram params configs/experiments/recall5.yaml")
    p.add_argument("config", help="preset, YAML config or experiment YAML")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_params)


def _cmd_params(args) -> int:
    from mhc import params, presets
    from sessions.experiment import is_experiment_file, load_experiment

    model = load_experiment(args.config, args.overrides).model \
        if is_experiment_file(args.config) else presets.load(args.config, args.overrides).model
    report = {**params.count(model).as_dict(), "kind": model.ffn.kind,
              "sharing": model.ffn.sharing}
    if model.ffn.is_moe and model.ffn.sharing != "none":
        report["sharing_saving"] = params.sharing_saving(model)
    print(json.dumps(report, indent=1))
    return 0


# ---- data --------------------------------------------------------------------------------
def _add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare data sets; write a task's episodes as JSONL",
                       formatter_class=RAW, epilog="""examples:
  engram data prepare                                  # the Shakespeare corpus into ./cache
  engram data episodes configs/experiments/recall5.yaml --split eval -n 20 --out eps.jsonl
""")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    prep = dsub.add_parser("prepare", help="download (once) and split the Shakespeare corpus")
    prep.add_argument("--cache", type=Path, default=Path("cache"))
    prep.set_defaults(func=_cmd_data_prepare)
    eps = dsub.add_parser("episodes", help="an experiment task's episodes as JSONL (the "
                          "format `engram run --episodes` reads)")
    eps.add_argument("config", help="experiment YAML")
    eps.add_argument("overrides", nargs="*")
    eps.add_argument("--split", choices=["train", "eval"], default="eval")
    eps.add_argument("-n", type=int, default=10, help="number of episodes")
    eps.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    eps.set_defaults(func=_cmd_data_episodes)


def _cmd_data_prepare(args) -> int:
    from sessions.data import prepare_shakespeare

    print(prepare_shakespeare(args.cache))
    return 0


def _cmd_data_episodes(args) -> int:
    from sessions.episodes import write_episodes

    exp = _experiment(args)
    task = exp.make_task(args.split)
    seed = exp.eval.seed if args.split == "eval" else exp.train.seed
    path = write_episodes(args.out, (task.episode(args.split, seed, i) for i in range(args.n)))
    print(f"{args.n} {args.split} episodes of task {task.name} -> {path}")
    return 0


# ---- bench -------------------------------------------------------------------------------
def _add_bench(sub) -> None:
    from sessions import bench_architectures as arch

    p = sub.add_parser("bench", help="benchmarks: the FFN architectures on multi-domain data")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bsub.required = True
    a = bsub.add_parser("architectures", help="every FFN kind trained and measured side by "
                        "side; writes docs/architecture_table.md", formatter_class=RAW,
                        description=arch.DESCRIPTION, epilog=arch.EPILOG)
    arch.add_arguments(a)
    a.set_defaults(func=arch.main)


# ---- traces ------------------------------------------------------------------------------
def _add_traces(sub) -> None:
    from memory_store.cli import add_traces_subcommands

    p = sub.add_parser("traces", help="inspect and administer a trace store",
                       formatter_class=RAW, description=(
        "Trace-store commands (the same as `python -m memory_store`), plus `reindex`, which "
        "recomputes Engram latent keys from the stored text with a checkpoint. Instead of "
        "--store DIR, --run RUN names a run folder: its arm's store (RUN/<arm>/store)."),
        epilog="""examples:
  engram traces list --run runs/smoke
  engram traces query --run runs/smoke "the code for locker" -k 5
  engram traces stats --run runs/recall5-ablate/seed0/on
""")
    tsub = p.add_subparsers(dest="traces_command", metavar="SUBCOMMAND")
    tsub.required = True
    add_traces_subcommands(tsub)
    r = tsub.add_parser("reindex", help="recompute latent keys/values from stored text",
                        description="Re-encode every trace that has a latent key with the "
                        "memory model in --checkpoint and replace its key, value and "
                        "model_version (stale keys after the model changed).")
    r.add_argument("--store", required=True, metavar="DIR", help="trace store directory")
    r.add_argument("--checkpoint", required=True, type=Path, help="Engram checkpoint folder")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_cmd_reindex)
    p.set_defaults(store_cli=True)


def _cmd_reindex(args) -> int:
    from sessions.reindex import reindex_store

    print(json.dumps(reindex_store(Path(args.store), args.checkpoint, args.batch_size,
                                   progress=not args.quiet)))
    return 0


def run_store(run: Path) -> Path:
    """The store of a run folder: RUN/store, or the one RUN/<arm>/store."""
    run = Path(run)
    if (run / "store").is_dir():
        return run / "store"
    found = sorted(p for p in run.glob("*/store") if p.is_dir())
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"--run {run}: no trace store in it (RUN/<arm>/store)")
    raise ValueError(f"--run {run}: several stores, name one: "
                     + ", ".join(str(p.parent) for p in found))


def _rewrite_run(argv: list[str]) -> list[str]:
    """``traces ... --run RUN`` -> ``traces ... --store RUN/<arm>/store``."""
    if not argv or argv[0] != "traces":
        return argv
    out, it = [], iter(argv)
    for a in it:
        if a == "--run" or a.startswith("--run="):
            value = a.split("=", 1)[1] if "=" in a else next(it, None)
            if value is None:
                raise ValueError("--run needs a run folder")
            out += ["--store", str(run_store(Path(value)))]
        else:
            out.append(a)
    return out


def _quiet_libraries() -> None:
    """--quiet also silences the embedding model's loading bars."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram", formatter_class=RAW, epilog=MAIN_EPILOG,
        description="Engram on mHC: persistent trace memory on a "
        "Mixture-of-Hierarchical-Components transformer. Experiments: engram run / ablate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_run, _add_ablate, _add_train, _add_eval, _add_params, _add_data,
                _add_traces, _add_bench):
        add(sub)
    return parser


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _world_size() > 1:  # torchrun: join the job; rank 0 alone prints results
        from sessions import distributed

        distributed.setup()
        distributed.silence_other_ranks()
    try:
        argv = _rewrite_run(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"engram: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also come after the options
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "quiet", False):
        _quiet_libraries()
    if getattr(args, "store_cli", False) and args.func is not _cmd_reindex:
        from memory_store.cli import run

        return run(args)  # the store CLI's own error handling (typed errors -> exit 2)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"engram: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
