"""``engram bench architectures``: the FFN kinds side by side on data with real domains, and
the source report's claims measured at our scale.

For each seed, every model trains for the same tokens (same steps, batch and sequence) on
``train.data=domains`` through the one trainer (``sessions.trainer.Trainer``, the path ``engram
train`` runs): dense, flat MoE, group-limited MoE, mHC hierarchical and progressive, each MoE
with sharing ``none`` and ``base``. Two matchings:

* ``active`` — every kind at the preset's expert width: equal active parameters per token
  (dense is ``hidden·k1·k2`` wide);
* ``total`` — each model's width chosen so its total parameters are closest to the standard
  MoE's (flat, no sharing) in the active matching.

Then ``sessions.arch_eval`` measures each model on held-out files and mixed items, and the
raw results (with hardware, versions, git state, command, load average, seeds) are written
as JSON; ``sessions.arch_table`` renders ``docs/architecture_table.md`` from results files
only. A collapsed router (``mhc.stats.collapse_reasons``) or a level-1 router the LM loss
does not reach fails the command (exit status 3) after everything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

KINDS = [("dense", "none"), ("flat_moe", "none"), ("flat_moe", "base"),
         ("group_limited", "none"), ("group_limited", "base"), ("hierarchical", "none"),
         ("hierarchical", "base"), ("progressive", "none"), ("progressive", "base")]
REFERENCE = ("flat_moe", "none")  # the standard MoE: the total-parameter target
MATCHINGS = ("active", "total")

_FFN = {"n_domains": 3, "k1": 1, "k2": 2, "aux_loss_coef": 0.01, "z_loss_coef": 1e-3,
        "domain_label_coef": 0.1}
PRESETS = {
    # a 2-core CPU: the two seeds side by side, one thread each (two threads per process
    # spin-wait badly on a busy machine); docs/architecture_table.md states the step times
    "cpu": {"model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "seq_len": 128,
                      "ffn": {**_FFN, "hidden": 64, "n_components": 4, "segment_len": 16}},
            "train": {"steps": 400, "batch_size": 16, "lr": 3e-3, "warmup_steps": 40,
                      "eval_batches": 6, "device": "cpu", "threads": 1},
            "seeds": 2, "jobs": 2, "fit_batches": 4, "latency_repeats": 30},
    # one H100/H200; every step replayed from one CUDA graph (an eager step of these small
    # MoE models is host-bound)
    "gpu": {"model": {"d_model": 256, "n_layers": 4, "n_heads": 4, "seq_len": 256,
                      "ffn": {**_FFN, "hidden": 256, "n_components": 8, "segment_len": 32}},
            "train": {"steps": 500, "batch_size": 32, "lr": 2e-3, "warmup_steps": 50,
                      "eval_batches": 8, "device": "cuda", "cuda_graph": True},
            "seeds": 2, "jobs": 1, "fit_batches": 4, "latency_repeats": 50},
    # tests: seconds
    "test": {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "seq_len": 32,
                       "ffn": {**_FFN, "hidden": 8, "n_components": 2, "segment_len": 8}},
             "train": {"steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                       "eval_batches": 1, "device": "cpu"},
             "seeds": 2, "jobs": 1, "fit_batches": 1, "latency_repeats": 2},
}


# ---- command line (registered by sessions.cli) -------------------------------------------
DESCRIPTION = (
    "Train dense, flat MoE, group-limited MoE, mHC hierarchical and progressive (MoE kinds "
    "with sharing none and base) for equal tokens on train.data=domains (literature, code, "
    "arithmetic; held-out files and mixed items), matched on active parameters and again on "
    "total parameters; measure parameters, routing latency, level-1 routing accuracy, "
    "held-out bits/byte per domain and on mixed items, load balance and collapse; write the "
    "results JSON and docs/architecture_table.md (the source report's claims beside ours). "
    "Exit status 3 when a router collapsed or the LM loss does not reach a level-1 router.")
EPILOG = """examples:
  engram bench architectures --preset cpu                 # 2 seeds side by side, 2 cores
  engram bench architectures --preset cpu --seeds 1 --jobs 1 train.threads=2
  engram bench architectures --preset gpu --seeds 2       # one H100/H200
  engram bench architectures --preset cpu train.steps=50 --results /tmp/r.json --table /tmp/t.md
  engram bench architectures --render                     # the table from saved results only
"""


def add_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", help="key=value on the preset (train.steps=100, "
                   "train.threads=1, model.ffn.hidden=32)")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--seeds", type=int, help="number of training seeds (default: the "
                   "preset's); seeds are 0..N-1")
    p.add_argument("--out", type=Path, help="training run folders (default "
                   "runs/bench_architectures/<preset>)")
    p.add_argument("--results", type=Path, help="results JSON (default "
                   "benchmarks/results/architectures_<preset>.json)")
    p.add_argument("--table", type=Path, default=Path("docs/architecture_table.md"),
                   help="the table to write from the results files")
    p.add_argument("--cache", type=Path, default=Path("cache"), help="data cache folder")
    p.add_argument("--render", action="store_true",
                   help="train nothing: write --table from the saved results files")
    p.add_argument("--jobs", type=int, help="seeds trained at a time, in worker processes "
                   "(default: the preset's; cpu: 2, each with train.threads=1)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def main(args) -> int:
    """The command (heavy imports here: ``engram --help`` stays fast)."""
    from sessions import arch_table
    from sessions.arch_run import run_bench

    results = args.results or Path("benchmarks/results") / f"architectures_{args.preset}.json"
    if args.render:
        files = arch_table.results_files(results)
        if not files:
            raise FileNotFoundError(f"{results}: no results file to render")
        arch_table.write(args.table, files)
        print(f"table: {args.table} (from {', '.join(map(str, files))})")
        return 0
    n = args.seeds if args.seeds is not None else PRESETS[args.preset]["seeds"]
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n}")
    out = args.out or Path("runs/bench_architectures") / args.preset
    jobs = args.jobs if args.jobs is not None else PRESETS[args.preset]["jobs"]
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    res = run_bench(args.preset, list(range(n)), out, results, args.table, args.cache,
                    args.overrides, progress=not args.quiet, jobs=min(jobs, n))
    print(f"results: {results}; table: {args.table}; {res['wall_seconds'] / 60:.1f} min")
    failed = res["checks"]["collapsed"] + res["checks"]["level1_untrained"]
    for line in failed:
        print(f"engram: check failed: {line}", file=sys.stderr)
    return 3 if failed else 0
