"""The training and measuring loop of ``engram bench architectures``
(``sessions.bench_architectures`` has the presets, the kinds and the command): the model plan
of both matchings, one trainer run per model and seed on ``train.data=domains``, the
measurements of ``sessions.arch_eval``, the results JSON and the table.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mhc import params, presets
from mhc.config import ModelConfig, RunConfig
from mhc.model import MHCModel
from sessions import arch_eval, arch_table, domains
from sessions.bench_architectures import KINDS, PRESETS, REFERENCE
from sessions.data import Batch
from sessions.objectives import LMObjective
from sessions.runs import environment, write_json
from sessions.trainer import Trainer, pick_device


@dataclass
class ModelSpec:
    name: str  # kind or kind/sharing
    matching: str
    cfg: ModelConfig
    match_error: float = 0.0  # total params / target - 1 (total matching)


def base_run(preset: str, overrides: list[str] | None = None) -> RunConfig:
    """The preset's model and training, with ``key=value`` overrides (``train.steps=50``)."""
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    data = {"model": copy.deepcopy(p["model"]), "train": {**p["train"], "data": "domains"}}
    run = presets.build(presets.apply_overrides(data, overrides or []))
    if run.train.data != "domains":
        raise ValueError("train.data: the architecture bench runs on train.data=domains")
    return run


def _variant(cfg: ModelConfig, kind: str, sharing: str, hidden: int) -> ModelConfig:
    return replace(cfg, ffn=replace(cfg.ffn, kind=kind, sharing=sharing, hidden=hidden))


def plan(run: RunConfig) -> list[ModelSpec]:
    """Every model of both matchings."""
    cfg, h = run.model, run.model.ffn.hidden
    specs = [ModelSpec(_name(k, s), "active", _variant(cfg, k, s, h)) for k, s in KINDS]
    target = params.count(_variant(cfg, *REFERENCE, h)).total
    for k, s in KINDS:
        best = min(range(1, 16 * h + 1),
                   key=lambda w: abs(params.count(_variant(cfg, k, s, w)).total - target))
        total = params.count(_variant(cfg, k, s, best)).total
        specs.append(ModelSpec(_name(k, s), "total", _variant(cfg, k, s, best),
                               total / target - 1))
    return specs


def _name(kind: str, sharing: str) -> str:
    return kind if kind == "dense" else f"{kind}/{sharing}"


def run_bench(preset: str, seeds: list[int], out_dir: Path, results_path: Path,
              table_path: Path | None, cache_dir: Path = Path("cache"),
              overrides: list[str] | None = None, progress: bool = True,
              jobs: int = 1) -> dict:
    """Train and measure every model for every seed; write results (and the table).
    ``jobs`` > 1 runs that many seeds at a time in worker processes (give each
    ``train.threads=1`` on a 2-core machine)."""
    began = time.perf_counter()
    run = base_run(preset, overrides)
    p = PRESETS[preset]
    env = {**environment(seeds, ["engram", *sys.argv[1:]] if sys.argv else None),
           "load_avg_start": os.getloadavg(), "torch_threads": _threads(run), "jobs": jobs}
    device = pick_device(run.train.device)
    results = {"preset": preset, "seeds": seeds, "env": env, "settings": {
        "model": presets.to_plain(run.model), "train": presets.to_plain(run.train),
        "fit_batches": p["fit_batches"], "latency_repeats": p["latency_repeats"],
        "kinds": KINDS, "reference": REFERENCE, "latency_backends": _backends(device)},
        "data": {}, "runs": []}
    args = [(preset, seed, out_dir, cache_dir, overrides, progress) for seed in seeds]
    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            per_seed = list(pool.map(_seed_runs, *zip(*args, strict=True)))
    else:
        per_seed = [_seed_runs(*a) for a in args]
    for seed, (meta, rows) in zip(seeds, per_seed, strict=True):
        results["data"][str(seed)] = meta
        results["runs"] += rows
    env["load_avg_end"] = os.getloadavg()
    results["wall_seconds"] = time.perf_counter() - began
    results["checks"] = arch_table.checks(results)
    write_json(results_path, results)
    if table_path is not None:
        arch_table.write(table_path, arch_table.results_files(results_path))
    return results


def _backends(device: torch.device) -> list[str]:
    return ["torch"] if device.type == "cpu" else ["triton", "torch"]


def _seed_runs(preset: str, seed: int, out_dir: Path, cache_dir: Path,
               overrides: list[str] | None, progress: bool) -> tuple[dict, list[dict]]:
    """Every model of one seed: (the data's meta, the rows)."""
    run = base_run(preset, overrides)
    _threads(run)
    p, specs = PRESETS[preset], plan(run)
    device = pick_device(run.train.device)
    seed_run = replace(run, train=replace(run.train, seed=seed))
    objective = LMObjective(seed_run, cache_dir, quiet=True)
    meta = domains.build(cache_dir, seed).meta
    done: dict[str, tuple[dict, MHCModel]] = {}  # config -> (row, trained model)
    rows = []
    for mi, spec in enumerate(specs):
        key = json.dumps(presets.to_plain(spec.cfg), sort_keys=True)
        if key in done:  # the same model in both matchings: trained once
            first = done[key][0]
            row = {**first, "matching": spec.matching, "match_error": spec.match_error,
                   "same_as": f"{first['model']} ({first['matching']})"}
        else:
            row, model = _one(spec, seed_run, objective, Path(out_dir) / f"seed{seed}", p,
                              device)
            done[key] = (row, model)
        rows.append((key, row))
        if progress:
            print(f"[seed {seed}: {mi + 1}/{len(specs)}] {spec.matching:6s} "
                  f"{arch_table.one_line(row)}", flush=True)
    # routing latency of every model side by side, on the same held-out tokens
    probe = _concat([objective.val_sets[n][0] for n in domains.DOMAIN_NAMES])
    latency = arch_eval.routing_latency({k: m for k, (_, m) in done.items()}, probe, device,
                                        _backends(device), p["latency_repeats"])
    for key, row in rows:
        row["latency"] = latency.get(key, {})
    rows = [row for _, row in rows]
    return meta, rows


def _threads(run: RunConfig) -> int:
    if run.train.threads:
        torch.set_num_threads(run.train.threads)
    return torch.get_num_threads()


def _one(spec: ModelSpec, run: RunConfig, objective: LMObjective, out_dir: Path, p: dict,
         device: torch.device) -> tuple[dict, MHCModel]:
    """Train one model and measure it (all but its latency): ``(row, trained model)``."""
    t = run.train
    train = replace(t, out_dir=str(out_dir / f"{spec.name.replace('/', '-')}-{spec.matching}"),
                    eval_every=t.steps, checkpoint_every=t.steps,
                    log_every=max(1, t.steps // 5))
    torch.manual_seed(t.seed)
    model = MHCModel(spec.cfg)
    accounted, counted = params.count(spec.cfg), arch_eval.counted_params(model)
    if (accounted.total, accounted.active) != (counted["total"], counted["active"]):
        raise RuntimeError(f"{spec.name}: parameter accounting {accounted.as_dict()} differs "
                           f"from the counted {counted}")
    began = time.perf_counter()
    trainer = Trainer(model, objective, train, Path(train.out_dir),
                      {"model": presets.to_plain(spec.cfg), "train": presets.to_plain(train)},
                      progress=False)
    result = trainer.fit()
    last = [r for r in _read_jsonl(Path(train.out_dir) / "metrics.jsonl") if "loss" in r][-1]
    model = trainer.model
    labels = domains.DOMAIN_NAMES
    fit = [objective.sampler.batch(10**6 + i) for i in range(p["fit_batches"])]
    ev = arch_eval.evaluate(model, objective.val_sets, fit, labels, device)
    probe = _concat([objective.val_sets[n][0] for n in labels])
    ev["level1_grad_ratio"] = arch_eval.level1_grad_ratio(model, probe, device)
    return {"model": spec.name, "kind": spec.cfg.ffn.kind, "sharing": spec.cfg.ffn.sharing,
            "matching": spec.matching, "match_error": spec.match_error, "seed": t.seed,
            "hidden": spec.cfg.ffn.hidden,
            "params": {**accounted.as_dict(), "counted_total": counted["total"],
                       "counted_active": counted["active"]},
            "train": {"steps": result.step, "tokens": result.step * t.batch_size *
                      spec.cfg.seq_len, "seconds": result.train_seconds,
                      "step_ms": 1e3 * result.train_seconds / max(result.step, 1),
                      "final_loss": last["loss"],
                      "stats": {k: last[k] for k in ("expert_cv", "dead_experts", "domain_cv")
                                if k in last}},
            "eval": ev, "wall_seconds": time.perf_counter() - began}, model


def _concat(batches: list[Batch]) -> Batch:
    return Batch(torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches]),
                 torch.cat([b.domains for b in batches]))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
