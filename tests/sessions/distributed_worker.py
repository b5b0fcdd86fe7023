"""The jobs ``test_distributed.py`` runs on several ranks, and the recorder both sides use.

    torchrun --nproc_per_node=2 --standalone distributed_worker.py SPEC.json OUT_DIR

``SPEC.json`` is a list of jobs ``{"name", "kind": lm|episodes|run|experts, "overrides",
"resume"}``; the first three run through the real pipeline functions (``train_backbone``,
``train_model``, ``run_experiment``: the last job, it leaves the process group after
training) into ``OUT_DIR/<name>``; ``experts`` compares an MoE
layer with expert parallelism against the same layer replicated. Every rank writes what it
saw to ``OUT_DIR/rank<r>.json``: the expert counts each training step's bias update
received, and the job's result.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "experiments" / "smoke.yaml")


@contextmanager
def router_counts():
    """Record, for every training step, the per-layer expert counts the router-bias update
    sees (``MHCModel.update_router_biases``, called once per optimizer step)."""
    from mhc.model import MHCModel

    seen: list[list[list[int]]] = []
    original = MHCModel.update_router_biases

    def recording(self, layers):
        seen.append([a.counts_E.tolist() for a in layers if a.counts_E is not None])
        return original(self, layers)

    MHCModel.update_router_biases = recording
    try:
        yield seen
    finally:
        MHCModel.update_router_biases = original


def run_job(job: dict, out: Path) -> dict:
    """One job in this process (one rank of a job, or the single-process reference)."""
    from mhc import presets
    from sessions.experiment import load_experiment
    from sessions.pipeline import train_backbone, train_model
    from sessions.run import run_experiment

    if job["kind"] == "experts":
        return expert_parallel_errors()
    resume = Path(job["resume"]) if job.get("resume") else None
    with router_counts() as counts:
        if job["kind"] == "lm":
            run = presets.load("debug", [*job["overrides"], f"train.out_dir={out}"])
            result = train_backbone(run, resume, progress=False)
            info = {"val": result.val, "step": result.step}
        elif job["kind"] == "episodes":
            _, info = train_model(load_experiment(SMOKE, job["overrides"]), "on", out,
                                  progress=False)
        else:
            summary = run_experiment(load_experiment(SMOKE, job["overrides"]), out,
                                     progress=False)
            info = {"evaluated": summary is not None}
    return {"counts": counts, **info}


def expert_parallel_errors() -> dict:
    """An MoE layer (the same weights on every rank, different tokens per rank) with its
    experts placed on the ranks vs replicated: largest differences of the output, the input
    and router gradients, and the local experts' gradients (vs the replicated gradients
    summed over the ranks)."""
    import torch
    import torch.distributed as dist

    from mhc.config import FFNConfig
    from mhc.moe import MHCFFN
    from sessions.expert_parallel import ExpertParallel, ExpertParallelExperts, ExpertPlacement

    cfg = FFNConfig(kind="hierarchical", hidden=8, n_domains=2, n_components=3, k1=1, k2=2)
    torch.manual_seed(0)
    layer = MHCFFN(16, cfg)
    x = torch.randn(3, 5 + dist.get_rank(), 16, generator=torch.Generator().manual_seed(
        dist.get_rank() + 1))  # uneven token counts per rank
    weight = torch.randn(16)

    def run(ffn):
        xi = x.clone().requires_grad_(True)
        y, _ = ffn(xi)
        (y * weight).sum().backward()
        return y.detach(), xi.grad

    y_ref, gx_ref = run(layer)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    ep = ExpertParallel(ExpertPlacement(cfg.n_experts, dist.get_world_size()))
    slots = ep.placement.slots(ep.rank)
    layer.experts = ExpertParallelExperts(layer.experts, ep)
    y, gx = run(layer)
    errors = {"output": (y - y_ref).abs().max().item(), "input_grad": (gx - gx_ref).abs().max()
              .item(), "router_grad": (layer.router.weight_DR.grad - grads["router.weight_DR"])
              .abs().max().item(), "local_slots": list(slots)}
    for name, p in layer.experts.local.named_parameters():
        total = grads[f"experts.{name}"].clone()
        dist.all_reduce(total)
        errors[name] = (p.grad - total[slots.start:slots.stop]).abs().max().item()
    return errors


def main(spec_path: str, out_dir: str) -> None:
    from sessions import distributed

    ctx = distributed.setup()
    jobs = json.loads(Path(spec_path).read_text())
    seen = {job["name"]: run_job(job, Path(out_dir) / job["name"]) for job in jobs}
    seen["context"] = {"rank": ctx.rank, "world_size": ctx.world_size,
                       "backend": ctx.backend, "env_rank": os.environ.get("RANK")}
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(*sys.argv[1:])
