"""What Engram costs, through the path users run: the one trainer's step on an experiment's
episodes with the memory module absent vs present (``Trainer._step`` with the same
``EpisodeObjective``), and greedy decoding of the answers with and without memory.

Training step: ``off`` is the plain mHC model scoring the episodes' probes; ``on`` also
encodes every context segment into a trace (the backbone alone), writes them softly into a
TensorMemory and reads them. On CUDA that write pass replays CUDA graphs
(``objective.graph_write``, the default); a third arm, ``on-eager-write``, runs it eagerly
(the same model and batches) to show what the graphs save. Generation: the answers of the
last session's probes decoded byte by byte (no KV cache in either arm), ``on`` reading the
episode's traces (written before the timer starts: the earlier sessions wrote them; on CUDA
that decoding memory is built by the same graphed pass, so its counts cover both shapes).
Medians over interleaved repeats (off, on, off, on, ...) in one process. On CUDA each arm's
GPU-busy ms per step is recorded too (kernel and copy time from the profiler): a step whose
wall time is far above it is host-bound.
``--profile N`` prints each arm's N ops of most host (self CPU) time, and its count of aten
ops (profiler events, nested ones included: a before/after measure, not a dispatch count).

    python benchmarks/bench_train_memory.py                                   # recall5, CPU
    python benchmarks/bench_train_memory.py configs/experiments/recall5_small.yaml \\
        train.device=cuda --profile 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._results import append_result, environment  # noqa: E402
from benchmarks.bench_train_e2e import gpu_busy  # noqa: E402
from sessions.encoding import encode_probes  # noqa: E402
from sessions.experiment import load_experiment  # noqa: E402
from sessions.objectives import EpisodeObjective, move  # noqa: E402
from sessions.pipeline import build_model  # noqa: E402
from sessions.trainer import Trainer, autocast  # noqa: E402

DEFAULT = str(Path(__file__).resolve().parent.parent / "configs" / "experiments" / "recall5.yaml")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def decode(trainer: Trainer, objective: EpisodeObjective, start: int, n: int) -> tuple:
    """(bytes decoded, seconds): the last session's answers, greedy, one byte at a time."""
    model, device = trainer.model.eval(), trainer.device
    eps = objective.episodes("eval", start, n)
    last = len(eps[0].sessions) - 1
    with autocast(device):
        mem = objective.build_memory(model, move(objective.encode(eps), device)) \
            if model.memory_enabled else None
    probes = encode_probes(eps, [last], objective.seq_len)
    first = int(probes.first_answer_P.min())  # same prompt cut for every row: a fair loop
    idx = probes.idx_PS[:, :first + 1].to(device)
    reader = mem.rows(probes.row_P) if mem is not None else None
    session = probes.session_P.to(device)
    steps = 4

    def run():
        nonlocal idx
        cur = idx
        for _ in range(steps):
            with autocast(device):
                logits = model(cur, memory=reader, session=session).out.logits[:, -1]
            cur = torch.cat([cur, logits.argmax(-1, keepdim=True)], 1)

    seconds = timed(run, device)
    model.train()
    return len(probes) * steps, seconds


def host_profile(step, top: int) -> str:
    """One step under the profiler (host side): the ops of most self CPU time, and the
    op count — what an eager, host-bound step spends its time on."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ev = prof.key_averages()
    n_ops = sum(e.count for e in ev if e.key.startswith("aten::"))
    table = ev.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)
    return f"aten op events per step (nested included): {n_ops}\n{table}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=DEFAULT, help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the experiment")
    p.add_argument("--repeats", type=int, default=10, help="measurements per arm")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print each arm's N ops of most host time (one step, after timing)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    exp = load_experiment(args.config, args.overrides)
    objective = EpisodeObjective(exp, exp.train.seed, exp.objective.probes_per_episode)
    arms = {"off": objective, "on": objective}
    if exp.train.device != "cpu" and torch.cuda.is_available() and exp.objective.graph_write:
        eager = load_experiment(args.config, [*args.overrides, "objective.graph_write=false"])
        arms["on-eager-write"] = EpisodeObjective(eager, eager.train.seed,
                                                  eager.objective.probes_per_episode)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {arm: Trainer(build_model(exp, arm.split("-")[0]), obj, exp.train,
                                 Path(tmp) / arm, {}, progress=False)
                    for arm, obj in arms.items()}
        device = trainers["on"].device
        times = {f"{kind}_{arm}": [] for kind in ("step", "gen") for arm in trainers}
        tokens = {}
        for i in range(args.repeats + 2):
            for arm, tr in trainers.items():  # interleaved: off, on, off, on ...
                out = {}
                step_s = timed(lambda tr=tr, o=out, i=i: o.update(s=tr._step(i)[0]), device)
                tokens[arm] = out["s"].tokens
                if i >= 2:  # two warm-up rounds
                    times[f"step_{arm}"].append(step_s)
                if arm in ("off", "on"):
                    n_bytes, gen_s = decode(tr, objective, i * 4, 4)
                    if i >= 2:
                        times[f"gen_{arm}"].append(n_bytes / gen_s)
        busy = {}
        for arm, tr in trainers.items():  # every arm on the same batch (shapes vary)
            step = lambda tr=tr: tr._step(args.repeats + 2)  # noqa: E731
            if device.type == "cuda":
                busy[arm] = gpu_busy(step, steps=2)[0]
            if args.profile:
                print(f"--- {arm}: host profile of one step ---")
                print(host_profile(step, args.profile))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    row = {"config": Path(args.config).name, "overrides": args.overrides,
           "device": str(device), "batch": exp.train.batch_size, "repeats": args.repeats,
           "step_ms_off": med["step_off"] * 1e3, "step_ms_on": med["step_on"] * 1e3,
           "step_ratio": med["step_on"] / med["step_off"],
           "gpu_busy_ms_off": busy.get("off"), "gpu_busy_ms_on": busy.get("on"),
           "tokens_per_step_off": tokens["off"], "tokens_per_step_on": tokens["on"],
           "gen_bytes_s_off": med["gen_off"], "gen_bytes_s_on": med["gen_on"],
           "gen_ratio": med["gen_on"] / med["gen_off"]}
    if "step_on-eager-write" in med:
        graphed = arms["on"]._write_passes[trainers["on"].model.backbone]
        row.update(step_ms_on_eager_write=med["step_on-eager-write"] * 1e3,
                   step_ratio_eager_write=med["step_on-eager-write"] / med["step_off"],
                   gpu_busy_ms_on_eager_write=busy.get("on-eager-write"),
                   write_pass_graphs=graphed.captures, write_pass_replays=graphed.replays,
                   write_pass_eager=graphed.eager_calls)
    print(f"{'device':7} {'step off ms':>12} {'step on ms':>11} {'ratio':>6} "
          f"{'decode off B/s':>15} {'decode on B/s':>14} {'ratio':>6}")
    print(f"{row['device']:7} {row['step_ms_off']:12.1f} {row['step_ms_on']:11.1f} "
          f"{row['step_ratio']:6.2f} {row['gen_bytes_s_off']:15.1f} "
          f"{row['gen_bytes_s_on']:14.1f} {row['gen_ratio']:6.2f}")
    if "step_ms_on_eager_write" in row:
        print(f"on, write pass eager: {row['step_ms_on_eager_write']:.1f} ms "
              f"({row['step_ratio_eager_write']:.2f}x off); the graphed write pass: "
              f"{row['write_pass_graphs']} graph(s), {row['write_pass_replays']} replays, "
              f"{row['write_pass_eager']} eager calls (training and decoding)")
    if busy:
        print("GPU-busy ms per step: " + ", ".join(f"{a} {v:.1f}" for a, v in busy.items()))
    print(f"env: {environment()}")
    if not args.no_save:
        append_result("bench_train_memory", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
