"""The ``engram`` command line: the platform's one entry point.

    engram train CONFIG [key=value ...]   train a preset or YAML config (optionally resume)
    engram eval CHECKPOINT                validation loss of a saved checkpoint
    engram params CONFIG [key=value ...]  total / active parameter accounting
    engram data prepare                   download and split the Shakespeare corpus
    engram ablate [CONFIG] [key=value ...] the memory ablation on cross-session recall
    engram run --checkpoint DIR --store DIR   recall episodes through the persistent store
    engram traces ...                     ingest / query / list / show / export / stats /
                                          verify / delete / reindex traces in a store

CONFIG is a preset name (tiny, small, debug) or a YAML file such as configs/tiny.yaml.
Overrides are dotted keys (model.ffn.kind=flat_moe, train.steps=100) or bare field names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  engram train tiny                         # the tiny preset on this machine
  engram train configs/tiny.yaml model.ffn.kind=progressive train.max_minutes=5
  engram train tiny --resume runs/tiny/checkpoint train.steps=4000
  engram params tiny model.ffn.sharing=base
"""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model", description=(
        "Train the mHC backbone. Writes RUN/metrics.jsonl and RUN/checkpoint/ "
        "(model.safetensors, optimizer.safetensors, config.json), prints validation loss."),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("config", help="preset name (tiny, small, debug) or YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--resume", type=Path, help="checkpoint folder to continue from; its saved "
                   "config is used, with the overrides applied on top")
    p.add_argument("--out", help="output folder (same as train.out_dir=...)")
    p.add_argument("--cache", type=Path, default=Path("cache"), help="data cache folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from mhc import presets
    from sessions import checkpoint
    from sessions.train import train

    overrides = list(args.overrides) + ([f"train.out_dir={args.out}"] if args.out else [])
    if args.resume:
        base = presets.to_plain(checkpoint.load_run_config(args.resume))
        run = presets.build(presets.apply_overrides(base, overrides))
    else:
        run = presets.load(args.config, overrides)
    result = train(run, resume=args.resume, progress=not args.quiet, cache_dir=args.cache)
    summary = {"ffn": run.model.ffn.kind, "steps": result.step,
               "train_seconds": round(result.train_seconds, 1), "val": result.val,
               "val_loss": result.val_loss, "checkpoint": str(result.out_dir / "checkpoint")}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"done: {result.step} steps in {result.train_seconds:.0f} s; validation loss "
              + ", ".join(f"{k} {v:.3f}" for k, v in result.val.items())
              + f" nats/byte; checkpoint {summary['checkpoint']}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on the validation split")
    p.add_argument("checkpoint", type=Path, help="checkpoint folder")
    p.add_argument("--cache", type=Path, default=Path("cache"))
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    import torch

    from mhc.model import MHCModel
    from sessions import checkpoint
    from sessions.data import DOMAINS, build_streams, eval_batches
    from sessions.train import evaluate, pick_device

    run = checkpoint.load_run_config(args.checkpoint)
    device = pick_device(run.train.device)
    model = MHCModel(run.model).to(device)
    checkpoint.load(args.checkpoint, model)
    _, val_streams = build_streams(run.train.data, args.cache, seed=run.train.seed)
    sets = {DOMAINS[s.domain]: eval_batches(s, run.train.batch_size, run.model.seq_len,
                                            run.train.eval_batches) for s in val_streams}
    with torch.no_grad():
        print(json.dumps(evaluate(model, sets, device)))
    return 0


def _add_params(sub) -> None:
    p = sub.add_parser("params", help="parameter accounting (total and active per token)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_cmd_params)


def _cmd_params(args) -> int:
    from mhc import params, presets

    run = presets.load(args.config, args.overrides)
    report = {**params.count(run.model).as_dict(), "kind": run.model.ffn.kind,
              "sharing": run.model.ffn.sharing}
    if run.model.ffn.is_moe and run.model.ffn.sharing != "none":
        report["sharing_saving"] = params.sharing_saving(run.model)
    print(json.dumps(report, indent=1))
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare data sets into the local cache")
    p.add_argument("action", choices=["prepare"])
    p.add_argument("--cache", type=Path, default=Path("cache"))
    p.set_defaults(func=_cmd_data)


def _cmd_data(args) -> int:
    from sessions.data import prepare_shakespeare

    print(prepare_shakespeare(args.cache))
    return 0


def _memory_args(p) -> None:
    p.add_argument("--minutes", type=float, default=8.0,
                   help="training budget per model in minutes (default 8; 0 = run all steps)")
    p.add_argument("--steps", type=int, default=1500, help="training steps (the LR schedule)")
    p.add_argument("--batch-size", type=int, default=8, help="episodes per step")
    p.add_argument("--engram", nargs="*", default=[], metavar="KEY=VALUE",
                   help="EngramConfig overrides, e.g. top_k=4 write_budget=0.3")


def _engram_config(items: list[str]):
    from engram.config import EngramConfig
    from mhc.presets import _parse_value

    values = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--engram {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        values[key] = _parse_value(text)
    try:
        return EngramConfig(enabled=True, **values)
    except TypeError as err:
        raise ValueError(f"EngramConfig: {err}") from None


def _add_ablate(sub) -> None:
    p = sub.add_parser("ablate", help="memory ablation on the cross-session recall task",
                       description=(
        "Train the memory model on recall episodes (facts stated in session 1, asked in "
        "session 2), then evaluate the arms: no memory (module absent, trained alike), "
        "trained-off (module present, reads off), memory on with the learned write gate at a "
        "30% budget, a random 30%, and writing everything. Evaluation facts are never seen "
        "in training. Writes OUT/ablation.json, OUT/ablation.md, OUT/metrics_seed*.jsonl and "
        "the first seed's memory model to OUT/checkpoint."))
    p.add_argument("config", nargs="?", default="tiny", help="preset or YAML (default tiny)")
    p.add_argument("overrides", nargs="*", help="model/train key=value overrides")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--eval-episodes", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("runs/ablate"))
    p.add_argument("--no-baseline", action="store_true",
                   help="skip training the module-absent arm (saves ~40%% of the time)")
    p.add_argument("--quiet", action="store_true")
    _memory_args(p)
    p.set_defaults(func=_cmd_ablate)


def _cmd_ablate(args) -> int:
    from mhc import presets
    from sessions.ablate import run_ablation
    from sessions.memory_train import MemoryTrainConfig

    run = presets.load(args.config, args.overrides)
    cfg = MemoryTrainConfig(steps=args.steps, batch_size=args.batch_size,
                            max_minutes=args.minutes)
    result = run_ablation(run, _engram_config(args.engram), cfg, args.seeds, args.out,
                          n_eval=args.eval_episodes, progress=not args.quiet,
                          baseline=not args.no_baseline)
    print(result["table"])
    print(f"results: {args.out / 'ablation.json'}, {args.out / 'ablation.md'}")
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run recall episodes through a persistent trace store",
                       description=(
        "Load a memory checkpoint (from `engram ablate`), and for each episode write its "
        "session-1 traces into the store at --store (LMDB + FAISS, created if missing) and "
        "answer its session-2 question reading from the store. Prints accuracy as JSON."))
    p.add_argument("--checkpoint", type=Path, required=True, help="Engram checkpoint folder")
    p.add_argument("--store", type=Path, required=True, help="trace store folder")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--memory", choices=["on", "off", "trained-off"], default=None,
                   help="on: read the store; trained-off: module present, no reads; off: "
                   "module removed (default: ENGRAM_ENABLED, else on)")
    p.add_argument("--policy", choices=["budget", "threshold", "random", "all"], default=None,
                   help="write policy (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="evaluation episodes' seed")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from dataclasses import replace

    from engram.config import env_enabled
    from engram.model import EngramModel
    from sessions.memory_train import load_memory_model
    from sessions.run import run_store_episodes

    memory = args.memory or ("on" if env_enabled(True) else "off")
    model, run = load_memory_model(args.checkpoint)
    if memory == "off":  # the module absent: the backbone alone
        plain = EngramModel(run.model, replace(model.cfg, enabled=False))
        plain.backbone.load_state_dict(model.backbone.state_dict())
        model = plain
    result = run_store_episodes(model, args.store, args.episodes, memory, args.policy,
                                seed=args.seed, progress=not args.quiet)
    print(json.dumps(result))
    return 0


def _add_traces(sub) -> None:
    from memory_store.cli import add_traces_subcommands

    p = sub.add_parser("traces", help="inspect and administer a trace store",
                       description="Trace-store commands (the same as `python -m memory_store`)"
                       ", plus `reindex`, which recomputes Engram latent keys from the stored "
                       "text with a checkpoint.")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram", description="Engram on mHC: persistent trace memory on a "
        "Mixture-of-Hierarchical-Components transformer.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_train, _add_eval, _add_params, _add_data, _add_ablate, _add_run,
                _add_traces):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
