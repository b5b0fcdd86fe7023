"""Train a preset with MHC_KERNELS=triton and =torch through ``engram train``; compare the
loss curves.

Each backend runs in its own process (the switch is resolved once per process) with the same
seed and data, ``train.steps`` steps, loss logged every step, through the trainer users run:
on a GPU that is bf16 autocast with an fp32 residual stream, so both runs route bf16 rows and
every expert matmul takes ``torch._grouped_mm`` (one op for both backends: the curves compare
the Triton routing kernels against the torch reference routing, nothing else). Tolerance
(stated before the run): at every step |loss_triton − loss_torch| ≤ 0.05 nats/byte, and the
final losses within 1 %. The two paths differ only by float summation order and bf16
rounding, so the curves should agree far better than that; a selection flip shows as a jump.

A third run repeats the torch reference (on by default; ``--no-control`` skips it): how far
the reference moves from itself run to run (GPU atomics, nondeterministic reductions) is the
noise floor the Triton-vs-torch difference is read against. It is reported, not part of the
pass test. ``--repeats N`` runs each backend N times and compares every Triton-vs-torch pair
of runs ("cross") with every pair of runs of one backend ("within"): a per-step maximum over
a few hundred steps of two diverging trajectories is itself a noisy number, and the pairs
show whether the cross differences sit inside the backends' own run-to-run spread.

    PYTHONUNBUFFERED=1 python benchmarks/train_kernels_parity.py [--preset small] \
        [--steps 200] [--repeats 3] [--json out.json] [train.cuda_graph=true ...]

Trailing ``key=value`` arguments are passed to ``engram train`` for both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._results import environment  # noqa: E402

MAX_ABS, FINAL_REL = 0.05, 0.01


def run_backend(backend: str, preset: str, steps: int, out: Path,
                overrides: list[str] = ()) -> list[float]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, MHC_KERNELS=backend, PYTHONPATH=path)
    cmd = [sys.executable, "-m", "sessions", "train", preset, f"train.steps={steps}",
           "train.log_every=1", f"train.eval_every={steps + 1}", "train.max_minutes=0",
           *overrides, "--out", str(out), "--quiet", "--json"]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _compare(a: list[float], b: list[float]) -> dict:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return dict(max_abs=max(diffs), mean_abs=sum(diffs) / len(diffs),
                final_rel=abs(a[-1] - b[-1]) / abs(b[-1]))


def replicate_pairs(curves: dict[str, list[float]]) -> dict[str, list[dict]]:
    """Every Triton-vs-torch pair of runs ("cross") and every pair of runs of one backend
    ("within": that backend's own run-to-run spread), each compared as ``_compare`` does."""
    tri = [k for k in curves if k.startswith("triton")]
    ref = [k for k in curves if k.startswith("torch")]
    same = [(x, y) for arm in (tri, ref) for i, x in enumerate(arm) for y in arm[i + 1:]]
    return {"cross": [dict(pair=[x, y], **_compare(curves[x], curves[y]))
                      for x in tri for y in ref],
            "within": [dict(pair=[x, y], **_compare(curves[x], curves[y])) for x, y in same]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="example: python benchmarks/train_kernels_parity.py --preset small --steps 200 "
               "--repeats 3 --json parity.json")
    ap.add_argument("--preset", default="debug", help="a preset or config file (debug, small)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the second torch-reference run (the run-to-run noise floor)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each backend (>1: every cross and within-backend pair of "
                         "runs is compared, the spread the stated test is read against)")
    ap.add_argument("overrides", nargs="*", help="key=value for engram train, both runs")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    arms = {"triton": "triton", "torch": "torch"}
    if args.control:
        arms["torch_again"] = "torch"
    for i in range(2, args.repeats + 1):
        arms[f"triton_{i}"], arms[f"torch_{i}"] = "triton", "torch"
    with tempfile.TemporaryDirectory() as tmp:
        curves = {}
        for n, (arm, backend) in enumerate(arms.items(), 1):
            print(f"run {n}/{len(arms)}: {arm} (MHC_KERNELS={backend})", flush=True)
            curves[arm] = run_backend(backend, args.preset, args.steps, Path(tmp) / arm,
                                      args.overrides)
    a, b = curves["triton"], curves["torch"]
    first = _compare(a, b)
    control = _compare(curves["torch_again"], b) if args.control else None
    ok = first["max_abs"] <= MAX_ABS and first["final_rel"] <= FINAL_REL
    pairs = replicate_pairs(curves)
    spread = {kind: {stat: statistics.median(p[stat] for p in ps)
                     for stat in ("max_abs", "mean_abs")} for kind, ps in pairs.items() if ps}
    res = dict(preset=args.preset, overrides=args.overrides, steps=len(a),
               max_abs_diff=first["max_abs"], mean_abs_diff=first["mean_abs"],
               control_max_abs_diff=control["max_abs"] if control else None,
               control_mean_abs_diff=control["mean_abs"] if control else None,
               final_triton=a[-1], final_torch=b[-1], final_rel_diff=first["final_rel"],
               tolerance=dict(max_abs=MAX_ABS, final_rel=FINAL_REL), passed=ok,
               pairs=pairs, median_of_pairs=spread, environment=environment(), curves=curves)
    for i in range(0, len(a), max(1, len(a) // 10)):
        again = f"  torch again |d| {abs(curves['torch_again'][i] - b[i]):.2e}" \
            if args.control else ""
        print(f"step {i + 1:4d}: triton {a[i]:.4f}  torch {b[i]:.4f}  "
              f"|d| {abs(a[i] - b[i]):.2e}{again}")
    if len(pairs["cross"]) > 1:
        print(f"{'pairs':<8} {'n':>3} {'median max|d|':>14} {'median mean|d|':>15} "
              f"{'worst final rel':>16}")
        for kind, ps in pairs.items():
            print(f"{kind:<8} {len(ps):>3} {spread[kind]['max_abs']:>14.4f} "
                  f"{spread[kind]['mean_abs']:>15.4f} {max(p['final_rel'] for p in ps):>16.4%}")
    print(json.dumps({k: v for k, v in res.items() if k not in ("curves", "pairs")}))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
