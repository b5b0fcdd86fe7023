"""Data-parallel training (``sessions.distributed``) against one process: 2 ranks under
torchrun with gloo on CPU, through the real pipeline (``distributed_worker.py`` and the
``engram`` CLI).

* text objective, DDP, FSDP2 and DDP with experts placed on the ranks (EP): every step's
  loss equals the one-process loss on the same global batch within ``LOSS_TOL``; every
  step's per-layer expert counts (what the bias balancing sees) equal the one-process counts
  exactly, on both ranks;
* checkpoints resume across world sizes (2 -> 1 and 1 -> 2, DDP, FSDP and EP) with the
  uninterrupted run's next-step loss;
* episodes: the step-1 loss is the mean of the two ranks' slices of the global batch
  (computed here in one process); DDP equals FSDP; later steps stay near one process;
* ``engram run`` on 2 ranks: rank 0 alone evaluates, its store holds each trace exactly once
  and equals a one-process evaluation of the same checkpoint;
* ``torchrun --nproc_per_node=2 engram train debug`` writes one run folder and one checkpoint;
* expert parallelism: an MoE layer whose experts are placed on the 2 ranks (all-to-all
  dispatch/combine) computes what the replicated layer computes, forward and backward.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from memory_store.store import TraceStore
from mhc.config import TrainConfig
from sessions import distributed
from sessions.distributed import Shard, _by_index, _by_name
from sessions.runs import read_jsonl

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import SMOKE, run_job  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# float32 summation order only (the ranks sum half-batch gradients, DDP/FSDP add them):
# observed <= 7.2e-7 nats/byte on losses near 5
LOSS_TOL = 1e-5
# the episode objective averages the ranks' per-slice means (token counts differ per
# slice), so after step 1 it follows a slightly different path (observed 4.7e-4 relative
# after 6 steps of the smoke experiment)
EPISODE_REL_TOL = 3e-3
LM = ["train.threads=1", "train.log_every=1", "model.ffn.bias_balancing=true",
      "model.ffn.bias_update_rate=0.01"]
EPISODES = ["train.threads=1", "train.log_every=1", "train.steps=6", "train.eval_every=1000",
            "model.ffn.bias_balancing=true"]
RUN = ["train.threads=1", "train.steps=4", "train.eval_every=1000", "eval.episodes=4",
       "eval.compare_off=false"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    return env


def torchrun(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Everything launched once: one-process references, one worker launch (2 ranks), one
    CLI launch (2 ranks), and the one-process resumes of the 2-rank checkpoints."""
    root = tmp_path_factory.mktemp("distributed")
    threads = torch.get_num_threads()
    try:
        one = {"ref": run_job({"kind": "lm", "overrides": LM}, root / "ref"),
               "half": run_job({"kind": "lm", "overrides": [*LM, "train.stop_after=10"]},
                               root / "half")}
        half = str(root / "half" / "checkpoint")
        jobs = [{"name": "ddp", "kind": "lm", "overrides": LM},
                {"name": "fsdp", "kind": "lm", "overrides": [*LM, "train.parallel=fsdp",
                                                             "train.stop_after=10"]},
                {"name": "ddp-from-1", "kind": "lm", "overrides": LM, "resume": half},
                {"name": "fsdp-from-1", "kind": "lm", "overrides": [*LM, "train.parallel=fsdp"],
                 "resume": half},
                {"name": "ep", "kind": "lm", "overrides": [*LM, "train.parallel=ep",
                                                           "train.stop_after=10"]},
                {"name": "ep-from-1", "kind": "lm", "overrides": [*LM, "train.parallel=ep"],
                 "resume": half},
                {"name": "episodes", "kind": "episodes", "overrides": EPISODES},
                {"name": "episodes-fsdp", "kind": "episodes",
                 "overrides": [*EPISODES, "train.parallel=fsdp"]},
                {"name": "experts", "kind": "experts"},
                {"name": "run", "kind": "run", "overrides": RUN}]  # last: it ends the group
        spec = root / "spec.json"
        spec.write_text(json.dumps(jobs))
        worker = torchrun(str(Path(__file__).parent / "distributed_worker.py"), str(spec),
                          str(root))
        ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
        cli = torchrun(engram_path(), "train", "debug", *LM, "train.stop_after=10", "--out",
                       str(root / "cli"))
        for name, ckpt in (("ddp-to-1", root / "cli"), ("fsdp-to-1", root / "fsdp"),
                           ("ep-to-1", root / "ep")):
            shutil.copytree(ckpt / "checkpoint", root / f"{name}-ckpt")
            one[name] = run_job({"kind": "lm", "overrides": LM,
                                 "resume": str(root / f"{name}-ckpt")}, root / name)
        one["episodes"] = run_job({"kind": "episodes", "overrides": EPISODES},
                                  root / "episodes-1")
        from sessions import cli as engram_cli

        assert engram_cli.main(["run", SMOKE, *RUN, "--checkpoint", str(root / "run" /
                                "checkpoint"), "--out", str(root / "run-1"), "--quiet"]) == 0
        yield {"root": root, "one": one, "ranks": ranks, "cli": cli, "worker": worker}
    finally:
        torch.set_num_threads(threads)


def engram_path() -> str:
    found = shutil.which("engram", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                         os.environ.get("PATH", "")]))
    assert found, "the engram console script is not installed (pip install -e .)"
    return found


def test_two_ranks_train_like_one_process(runs):
    root, ref, ranks = runs["root"], runs["one"]["ref"], runs["ranks"]
    want = losses(root / "ref")
    assert sorted(want) == list(range(1, 21))
    for name, steps in (("ddp", 20), ("fsdp", 10), ("ep", 10)):
        got = losses(root / name)
        assert sorted(got) == list(range(1, steps + 1)), name  # one row per step: one writer
        for step, loss in got.items():
            assert abs(loss - want[step]) <= LOSS_TOL, (name, step, loss, want[step])
        # the bias update of every step saw the global load, on both ranks
        assert ranks[0][name]["counts"] == ranks[1][name]["counts"] == ref["counts"][:steps]
    tokens = 4 * 32 * 2  # the global batch's routed rows: debug batch 4, seq 32, k1*k2 = 2
    assert all(sum(layer) == tokens for step in ranks[0]["ddp"]["counts"] for layer in step)
    for split, value in ranks[0]["ddp"]["val"].items():
        assert abs(value - ref["val"][split]) <= LOSS_TOL, split
    from safetensors.torch import load_file

    mine = load_file(root / "ddp" / "checkpoint" / "model.safetensors")
    theirs = load_file(root / "ref" / "checkpoint" / "model.safetensors")
    assert mine.keys() == theirs.keys()
    biases = [k for k in mine if k.endswith("bias_R")]
    assert biases and all(torch.equal(mine[k], theirs[k]) for k in biases)
    assert any(bool(mine[k].abs().sum() > 0) for k in biases)  # balancing moved them
    for k in mine:
        assert torch.allclose(mine[k], theirs[k], atol=1e-5, rtol=1e-4), k


def test_checkpoints_resume_on_another_world_size(runs):
    root, want = runs["root"], losses(runs["root"] / "ref")
    info = json.loads((root / "cli" / "checkpoint" / "config.json").read_text())
    assert (info["step"], info["world_size"], info["parallel"]) == (10, 2, "ddp")
    for name in ("ddp-to-1", "fsdp-to-1", "ep-to-1", "ddp-from-1", "fsdp-from-1",
                 "ep-from-1"):
        got = losses(root / name)
        assert sorted(got) == list(range(11, 21)), name
        assert abs(got[11] - want[11]) <= LOSS_TOL, (name, got[11], want[11])
        assert all(abs(got[s] - want[s]) <= LOSS_TOL for s in got), name


def test_episode_training_on_two_ranks(runs):
    from sessions.experiment import load_experiment
    from sessions.objectives import EpisodeObjective
    from sessions.pipeline import build_model

    root = runs["root"]
    ddp, fsdp, one = (losses(root / n) for n in ("episodes", "episodes-fsdp", "episodes-1"))
    assert sorted(ddp) == sorted(fsdp) == sorted(one) == list(range(1, 7))
    assert all(abs(ddp[s] - fsdp[s]) <= LOSS_TOL for s in ddp)
    # step 1: the mean of the two slices' losses of the global batch, at the initial weights
    exp = load_experiment(SMOKE, EPISODES)
    model = build_model(exp, "on")
    objective = EpisodeObjective(exp, exp.train.seed, exp.objective.probes_per_episode)
    halves = []
    with torch.no_grad():
        for rank in (0, 1):
            objective.shard = Shard(rank, 2)
            halves.append(float(objective.loss(model, objective.batch(0)).lm_loss))
    assert abs(ddp[1] - sum(halves) / 2) <= LOSS_TOL
    assert all(abs(ddp[s] - one[s]) <= EPISODE_REL_TOL * one[s] for s in one)
    ranks = runs["ranks"]
    assert ranks[0]["episodes"]["counts"] == ranks[1]["episodes"]["counts"]
    assert ranks[0]["episodes"]["counts"][0] == runs["one"]["episodes"]["counts"][0]


def _store_ids(store_dir: Path) -> Counter:
    with TraceStore.open(store_dir, mode="r") as store:
        return Counter((t.namespace, t.session, t.meta["external_id"])
                       for ns in store.namespaces() for s in store.sessions(ns)
                       for t in store.get(store._members(ns, s.session)))


def test_engram_run_on_two_ranks_writes_each_trace_once(runs):
    root, ranks = runs["root"], runs["ranks"]
    assert ranks[0]["run"]["evaluated"] and not ranks[1]["run"]["evaluated"]
    env = json.loads((root / "run" / "env.json").read_text())
    assert (env["world_size"], env["backend"]) == (2, "gloo")
    stored = _store_ids(root / "run" / "on" / "store")
    assert stored and set(stored.values()) == {1}  # each trace exactly once
    written = sum(len(r["written"]) for r in read_jsonl(root / "run" / "on" / "sessions.jsonl"))
    assert written == sum(stored.values())  # nothing lost
    # the same model evaluated by one process writes and reads the same traces
    assert stored == _store_ids(root / "run-1" / "on" / "store")
    a, b = (read_jsonl(root / d / "on" / "probes.jsonl") for d in ("run", "run-1"))
    assert len(a) == len(b) > 0
    assert [(x["prediction"], x["evidence_rank"]) for x in a] == \
        [(y["prediction"], y["evidence_rank"]) for y in b]


def test_torchrun_engram_train_debug(runs):
    out = runs["root"] / "cli"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "config.yaml", "env.json",
                                                     "metrics.jsonl"]
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors"]
    env = json.loads((out / "env.json").read_text())
    assert (env["world_size"], env["backend"]) == (2, "gloo")
    assert sorted(losses(out)) == list(range(1, 11))
    assert runs["cli"].stdout.count("done: 10 steps") == 1  # rank 0 prints, rank 1 does not
    assert runs["cli"].stdout.count("model: hierarchical ffn") == 1


def test_single_process_path_is_unchanged(tmp_path):
    from mhc import presets
    from sessions.objectives import LMObjective
    from sessions.trainer import Trainer

    assert "WORLD_SIZE" not in os.environ
    assert distributed.setup() == distributed.Context()
    run = presets.load("debug", [f"train.out_dir={tmp_path}"])
    objective = LMObjective(run, quiet=True)
    trainer = Trainer(torch.nn.Linear(2, 2), objective, run.train, tmp_path, {}, progress=False)
    assert trainer.parallel is None and objective.shard is None
    assert not torch.distributed.is_initialized()


def test_shard_slices_and_errors():
    from sessions.data import Batch

    x = torch.arange(8).view(4, 2)
    batch = Batch(x, x + 1, torch.arange(4))
    part = Shard(1, 2).rows(batch)
    assert torch.equal(part.x, x[2:]) and torch.equal(part.domains, torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="TrainConfig.batch_size: 4 is not divisible by"):
        Shard(0, 3).rows(batch)
    with pytest.raises(ValueError, match="TrainConfig.parallel"):
        TrainConfig(parallel="zero")


def test_episode_slices_must_run_the_same_forwards():
    from sessions.episodes import Episode, Probe, Session

    asked = Episode("a", (Session("s1", ("fact",), ()), Session("s2", (), (Probe("q ", "a"),))))
    silent = Episode("b", (Session("s1", ("fact",), ()),))
    with pytest.raises(ValueError, match="slices of a training batch differ"):
        Shard(0, 2).episodes([asked, silent], None)
    eps, chosen = Shard(1, 2).episodes([asked, asked], {(0, 1, 0), (1, 1, 0)})
    assert eps == [asked] and chosen == {(0, 1, 0)}


def test_optimizer_state_layouts_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[1].weight]},
                             {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0}])
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = opt.state_dict()
    named = _by_name(state, model, opt)
    assert named["param_groups"][0]["params"] == ["0.weight", "1.weight"]
    back = _by_index(named)
    assert back["param_groups"] == state["param_groups"]
    for i, slots in state["state"].items():
        assert all(torch.equal(v, back["state"][i][k]) for k, v in slots.items())


def test_expert_parallel_layer_equals_the_replicated_layer(runs):
    from sessions.expert_parallel import ExpertPlacement

    seen = [r["experts"] for r in runs["ranks"]]
    assert [e["local_slots"] for e in seen] == [[0, 1, 2], [3, 4, 5]]
    for e in seen:
        for name in ("output", "input_grad", "router_grad", "w_gate_up_PDH", "w_down_PFD"):
            assert e[name] <= 1e-6, (name, e[name])
    with pytest.raises(ValueError, match="6 experts do not divide over 4 ranks"):
        ExpertPlacement(6, 4)
