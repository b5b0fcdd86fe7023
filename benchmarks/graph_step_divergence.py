"""Where two training runs of the same small model part, step by step (CUDA): plain eager vs
GraphStep's eager path without capture (side stream, capturable learning rate) and vs its
graph replays; plain vs compiled eager; compiled eager vs a rerun, vs GraphStep's eager path
and vs compiled graph replays. Per step: both losses, the expert-count difference per layer,
and the largest relative difference of the parameters (and float buffers), of the AdamW
moments and of the experts' bf16 copies. The model and config are those of
``tests/sessions/test_graph_step.py``: ``configs/graph_check.yaml``.

What it found on the H200 (docs/benchmarks.md, run 10): plain eager, its side-stream warm-up
and its graph replays are bitwise equal; compiled training is not bitwise reproducible (a
rerun 3e-9 apart after one step), and the sign-based bias update grows that into routing
differences of tens of tokens by step 5, for a rerun as for the graph.

    PYTHONUNBUFFERED=1 python benchmarks/graph_step_divergence.py [--steps 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from mhc import presets  # noqa: E402
from mhc.model import MHCModel  # noqa: E402
from sessions.objectives import LMObjective  # noqa: E402
from sessions.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "graph_check.yaml"


def trainer(tmp: Path, name: str, steps: int, extra: list[str]) -> Trainer:
    run = presets.load(str(CONFIG), [f"train.steps={steps}", f"train.out_dir={tmp / name}",
                                     *extra])
    torch.manual_seed(run.train.seed)
    return Trainer(MHCModel(run.model), LMObjective(run, ROOT / "cache", quiet=True), run.train,
                   run.train.out_dir, presets.to_plain(run), progress=False)


def without_capture(tr: Trainer) -> Trainer:
    tr.graph.WARMUP = 10**9  # GraphStep's eager path only: side stream, capturable lr
    return tr


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.detach().float(), y.detach().float()
    return float((x - y).norm() / y.norm().clamp_min(1e-12))


def differences(a: Trainer, b: Trainer) -> dict[str, tuple[float, str]]:
    """The largest relative difference (and where) of parameters, AdamW moments, copies."""
    groups: dict[str, list] = {"param": [], "opt": [], "copy": []}
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(),
                                   strict=True):
        groups["param"].append((_rel(pa, pb), name))
        sa, sb = a.optimizer.state.get(pa, {}), b.optimizer.state.get(pb, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in sa and key in sb:
                groups["opt"].append((_rel(sa[key], sb[key]), f"{key}:{name}"))
        ca, cb = getattr(pa, "_attached_copy", None), getattr(pb, "_attached_copy", None)
        if ca is not None and cb is not None:
            groups["copy"].append((_rel(ca, cb), name))
    for (name, x), (_, y) in zip(a.model.named_buffers(), b.model.named_buffers(), strict=True):
        if x.is_floating_point():
            groups["param"].append((_rel(x, y), "buf:" + name))
    return {g: max(v) for g, v in groups.items() if v}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("graph_step_divergence: needs a CUDA GPU (CUDA graphs)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp())
    torch._dynamo.reset()
    on, g = ["train.compile=true"], ["train.cuda_graph=true"]

    def make(name, extra):
        return trainer(tmp, name, args.steps, extra)

    pairs = [("eager", make("eager", []), "side", without_capture(make("side", g))),
             ("eager", make("eager2", []), "graph", make("graph", g)),
             ("plain", make("plain", []), "c_eager", make("c_eager", on)),
             ("c_eager", make("c_eager1", on), "c_again", make("c_again", on)),
             ("c_eager", make("c_eager2", on), "c_side",
              without_capture(make("c_side", [*on, *g]))),
             ("c_eager", make("c_eager3", on), "c_graph", make("c_graph", [*on, *g]))]
    for na, a, nb, b in pairs:
        for s in range(args.steps):
            before = dict(counters["stats"])
            oa, ob = a._step(s)[0], b._step(s)[0]
            torch.cuda.synchronize()
            compiled = {k: v - before.get(k, 0) for k, v in counters["stats"].items()
                        if v != before.get(k, 0)}
            counts = [int((x.counts_E.float() - y.counts_E.float()).abs().sum())
                      for x, y in zip(oa.layers, ob.layers, strict=True)]
            print(f"{na} vs {nb} step {s + 1}: loss {float(oa.loss):.6f} / "
                  f"{float(ob.loss):.6f}; |d counts| per layer {counts}; dynamo {compiled}")
            print(f"  {nb} vs {na}: " + "; ".join(
                f"{grp} max {d:.2e} ({where})" for grp, (d, where) in differences(b, a).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
