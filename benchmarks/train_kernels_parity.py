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
pass test.

    PYTHONUNBUFFERED=1 python benchmarks/train_kernels_parity.py [--preset small] \
        [--steps 200] [--json out.json] [train.cuda_graph=true ...]

Trailing ``key=value`` arguments are passed to ``engram train`` for both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="debug", help="a preset or config file (debug, small)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the second torch-reference run (the run-to-run noise floor)")
    ap.add_argument("overrides", nargs="*", help="key=value for engram train, both runs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        arms = {"triton": "triton", "torch": "torch"}
        if args.control:
            arms["torch_again"] = "torch"
        curves = {arm: run_backend(backend, args.preset, args.steps, Path(tmp) / arm,
                                   args.overrides) for arm, backend in arms.items()}
    a, b = curves["triton"], curves["torch"]
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    control = [abs(x - y) for x, y in zip(curves["torch_again"], b, strict=True)] \
        if args.control else None
    final_rel = abs(a[-1] - b[-1]) / abs(b[-1])
    ok = max(diffs) <= MAX_ABS and final_rel <= FINAL_REL
    res = dict(preset=args.preset, overrides=args.overrides, steps=len(a),
               max_abs_diff=max(diffs),
               mean_abs_diff=sum(diffs) / len(diffs),
               control_max_abs_diff=max(control) if control else None,
               control_mean_abs_diff=sum(control) / len(control) if control else None,
               final_triton=a[-1], final_torch=b[-1], final_rel_diff=final_rel,
               tolerance=dict(max_abs=MAX_ABS, final_rel=FINAL_REL), passed=ok, curves=curves)
    for i in range(0, len(a), max(1, len(a) // 10)):
        print(f"step {i + 1:4d}: triton {a[i]:.4f}  torch {b[i]:.4f}  |d| {diffs[i]:.2e}"
              + (f"  torch again |d| {control[i]:.2e}" if control else ""))
    print(json.dumps({k: v for k, v in res.items() if k != "curves"}))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
