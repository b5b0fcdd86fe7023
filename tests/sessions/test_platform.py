"""The experiment platform end to end, through the CLI and the real store: a complete run
folder; byte-identical summary.json for the same config and seed; a run killed with SIGKILL
in the middle of a session resumes to the same summary with each trace stored exactly once;
the tensor and the store backends agree; the write policies write what they say; bad input
is a clear error that writes nothing; overrides reach the experiment (or fail)."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from memory_store.store import TraceStore
from sessions import cli
from sessions.runs import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "experiments" / "smoke.yaml")
RUN_FILES = ["config.yaml", "env.json", "metrics.jsonl", "summary.json", "report.md",
             "training.png", "accuracy_by_session.png", "accuracy_by_distance.png",
             "checkpoint/model.safetensors", "checkpoint/config.json", "on/store/store.json",
             "on/probes.jsonl", "on/retrievals.jsonl", "on/sessions.jsonl", "on/summary.json",
             "trained-off/probes.jsonl"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    assert cli.main(["run", SMOKE, "--out", str(out), "--quiet"]) == 0
    return out


def test_run_folder_is_complete(smoke_run):
    for name in RUN_FILES:
        assert (smoke_run / name).is_file(), name
    env = json.loads((smoke_run / "env.json").read_text())
    assert {"git_sha", "git_dirty", "versions", "command", "seeds", "world_size"} <= set(env)
    summary = json.loads((smoke_run / "summary.json").read_text())
    on = summary["arms"]["on"]
    assert on["probes"] == 8 * 3 and on["written"]["traces"] > 0
    assert summary["arms"]["trained-off"]["written"]["traces"] == 0
    retrievals = read_jsonl(smoke_run / "on" / "retrievals.jsonl")
    assert len(retrievals) == on["probes"] and all(r["traces"] for r in retrievals)


def test_same_config_and_seed_give_identical_summary(smoke_run, tmp_path):
    again = tmp_path / "again"
    assert cli.main(["run", SMOKE, "--out", str(again), "--quiet"]) == 0
    assert (again / "summary.json").read_bytes() == (smoke_run / "summary.json").read_bytes()
    # and running again into the same folder replaces the earlier run (no duplicate traces)
    assert cli.main(["run", SMOKE, "--out", str(again), "--quiet", "--checkpoint",
                     str(again / "checkpoint")]) == 0
    assert (again / "summary.json").read_bytes() == (smoke_run / "summary.json").read_bytes()


def _store_ids(store_dir: Path) -> Counter:
    with TraceStore.open(store_dir, mode="r") as store:
        return Counter((t.namespace, t.session, t.meta["external_id"])
                       for ns in store.namespaces() for s in store.sessions(ns)
                       for t in store.get(store._members(ns, s.session)))


@pytest.mark.parametrize("kill_after", [3, 5])
def test_sigkill_mid_session_then_resume(smoke_run, tmp_path, kill_after):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "run_and_kill.py"),
                           str(kill_after), "run", SMOKE, "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "summary.json").exists()
    assert cli.main(["run", SMOKE, "--out", str(out), "--quiet", "--resume"]) == 0
    assert (out / "summary.json").read_bytes() == (smoke_run / "summary.json").read_bytes()
    stored = _store_ids(out / "on" / "store")
    assert stored == _store_ids(smoke_run / "on" / "store")
    assert stored and set(stored.values()) == {1}  # each trace exactly once
    written = sum(len(r["written"]) for r in read_jsonl(out / "on" / "sessions.jsonl"))
    assert written == sum(stored.values())


def test_tensor_backend_agrees_with_the_store(smoke_run, tmp_path):
    out = tmp_path / "tensor"
    assert cli.main(["run", SMOKE, "--out", str(out), "--quiet", "--checkpoint",
                     str(smoke_run / "checkpoint"), "eval.backend=tensor"]) == 0
    a = read_jsonl(smoke_run / "on" / "probes.jsonl")
    b = read_jsonl(out / "on" / "probes.jsonl")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert (x["prediction"], x["exact"], x["evidence_rank"]) == \
            (y["prediction"], y["exact"], y["evidence_rank"])
        assert abs(x["answer_bits"] - y["answer_bits"]) < 1e-3
    ra, rb = (read_jsonl(d / "on" / "retrievals.jsonl") for d in (smoke_run, out))
    for x, y in zip(ra, rb, strict=True):
        assert [(t["session"], t["external_id"]) for t in x["traces"]] == \
            [(t["session"], t["external_id"]) for t in y["traces"]]


def test_write_policies_write_what_they_say(smoke_run, tmp_path):
    ckpt = str(smoke_run / "checkpoint")
    for arms, expect in [(["on:all"], lambda n: n), (["on"], lambda n: -(-3 * n // 10))]:
        out = tmp_path / arms[0].replace(":", "-")
        assert cli.main(["ablate", SMOKE, "--arms", *arms, "--out", str(out), "--quiet",
                         "train.steps=2"]) == 0
        rows = read_jsonl(out / "seed0" / arms[0].replace(":", "-") / "sessions.jsonl")
        assert rows and all(len(r["written"]) == expect(r["segments"]) for r in rows)
    assert ckpt


def test_bad_episodes_file_is_an_error_that_writes_nothing(smoke_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = {"namespace": "alice", "sessions": [{"id": "s1", "context": ["hi"], "probes": []}]}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(
        {"namespace": "bob", "sessions": [{"id": "s1", "context": ["x"],
                                           "probes": [{"prompt": "q", "answer": ""}]}]}) + "\n")
    out = tmp_path / "out"
    assert cli.main(["run", SMOKE, "--out", str(out), "--quiet", "--checkpoint",
                     str(smoke_run / "checkpoint"), "--episodes", str(bad)]) == 2
    assert "bad.jsonl:2: sessions[0].probes[0].answer" in capsys.readouterr().err
    assert not list(out.glob("*/store"))
    long = tmp_path / "long.jsonl"  # an answer that cannot fit the model's window
    long.write_text(json.dumps({"namespace": "c", "sessions": [{"id": "s1", "context": [],
                    "probes": [{"prompt": "q", "answer": "9" * 80}]}]}) + "\n")
    assert cli.main(["run", SMOKE, "--out", str(out), "--quiet", "--checkpoint",
                     str(smoke_run / "checkpoint"), "--episodes", str(long)]) == 2
    assert "does not fit" in capsys.readouterr().err and not list(out.glob("*/store"))


def test_own_episodes_run_through_the_same_runner(smoke_run, tmp_path):
    eps = tmp_path / "mine.jsonl"
    assert cli.main(["data", "episodes", SMOKE, "-n", "3", "--out", str(eps)]) == 0
    lines = eps.read_text().splitlines()
    mine = [json.loads(x) for x in lines]
    for i, ep in enumerate(mine):
        ep["namespace"] = f"user-{i}"
    eps.write_text("".join(json.dumps(e) + "\n" for e in mine))
    out = tmp_path / "run"
    assert cli.main(["run", SMOKE, "--out", str(out), "--quiet", "--checkpoint",
                     str(smoke_run / "checkpoint"), "--episodes", str(eps),
                     "train.seed=99"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 3 and summary["episodes_file"] == "mine.jsonl"
    # the evaluated model's own training seed, not the (unused) one of this command's config
    trained = json.loads((smoke_run / "summary.json").read_text())["seed"]
    assert trained != 99 and summary["seed"] == trained
    assert json.loads((out / "env.json").read_text())["seeds"] == [trained]
    with TraceStore.open(out / "on" / "store", mode="r") as store:
        assert set(store.namespaces()) == {"user-0", "user-1", "user-2"}


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", "no such key"), ("train.data=synthetic", "task section sets the data"),
    ("nope.x=1", "not a section"), ("task.colour=red", "task.colour"),
    ("eval.backend=gpu", "EvalConfig.backend"), ("ablate.arms=[on:maybe]", "arm 'on:maybe'"),
    ("train.steps=many", "TrainConfig.steps"),
])
def test_bad_overrides_are_errors(override, message, capsys):
    assert cli.main(["ablate", SMOKE, override, "--quiet", "--out", "/nonexistent/x"]) == 2
    assert message in capsys.readouterr().err


def test_ablate_overrides_reach_training_and_rows_record_seeds(tmp_path, capsys):
    out = tmp_path / "abl"
    assert cli.main(["ablate", SMOKE, "--arms", "off", "on", "--seeds", "3", "4", "--out",
                     str(out), "train.steps=3", "eval.episodes=4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| on |" in printed and str(out / "ablation.png") in printed
    result = json.loads((out / "ablation.json").read_text())
    assert [(r["seed"], r["arm"], r["steps"]) for r in result["rows"]] == [
        (3, "off", 3), (3, "on", 3), (4, "off", 3), (4, "on", 3)]
    assert result["config"]["train"]["steps"] == 3
    assert set(result["mean"]) == {"off", "on"} and result["mean"]["on"]["exact_match"]["n"] == 2
    for name in ("ablation.md", "ablation.png", "accuracy_by_session.png", "training.png"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "seed4" / "memory" / "checkpoint" / "config.json").read_text())
    assert meta["config"]["train"]["seed"] == 4


def test_memory_flag_reaches_run(smoke_run, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_ENABLED", "0")
    out = tmp_path / "off"
    assert cli.main(["run", SMOKE, "--out", str(out), "--quiet", "train.steps=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["arms"]) == ["off"]
    assert (out / "checkpoint" / "config.json").is_file()
    meta = json.loads((out / "checkpoint" / "config.json").read_text())
    assert meta["config"]["engram"]["enabled"] is False
    monkeypatch.delenv("ENGRAM_ENABLED")
    out2 = tmp_path / "trained-off"
    assert cli.main(["run", SMOKE, "--out", str(out2), "--quiet", "--memory", "trained-off",
                     "--checkpoint", str(smoke_run / "checkpoint")]) == 0
    assert list(json.loads((out2 / "summary.json").read_text())["arms"]) == ["trained-off"]


def test_traces_commands_take_a_run_folder(smoke_run, capsys):
    assert cli.main(["traces", "list", "--run", str(smoke_run), "--json"]) == 0
    assert "recall-eval-10000-0" in capsys.readouterr().out
    assert cli.main(["traces", "verify", "--run", str(smoke_run)]) == 0
    assert cli.main(["traces", "list", "--run", str(smoke_run / "missing")]) == 2


def test_recorded_commands_name_no_checkout_folders():
    from sessions.runs import ROOT, environment

    env = environment(command=["engram", "run", str(ROOT / "configs/x.yaml"),
                               f"task.data={ROOT.parent}/shared/d.json", "--out", "/elsewhere/r",
                               "train.steps=3"])
    assert env["command"] == ["engram", "run", "configs/x.yaml", "task.data=../shared/d.json",
                              "--out", "/elsewhere/r", "train.steps=3"]


def test_name_pair_analysis_counts_reversal_pairs(smoke_run, tmp_path):
    """``benchmarks/recall_name_pairs.py`` on a real run of an episodes file built with one
    reversal pair (LJ asked, JL given a code in between) and one plain fact: one probe with a
    pair at distance 2, one without at distance 1, and per distance the same exact match as
    the run's own summary."""
    ep = {"namespace": "pairs", "sessions": [
        {"id": "s1", "context": ["the code for locker LJ is 0565.", "locker QE opens with the "
                                 "code 3924."], "probes": []},
        {"id": "s2", "context": ["remember: locker JL has code 8172."], "probes": [
            {"prompt": "which code opens locker QE? ", "answer": "3924",
             "tags": {"distance": 1}}]},
        {"id": "s3", "context": ["the weather in oslo was grey today."], "probes": [
            {"prompt": "which code opens locker LJ? ", "answer": "0565",
             "tags": {"distance": 2}}]}]}
    eps = tmp_path / "pairs.jsonl"
    eps.write_text(json.dumps(ep) + "\n")
    out = tmp_path / "run"
    assert cli.main(["run", SMOKE, "--out", str(out), "--quiet", "--checkpoint",
                     str(smoke_run / "checkpoint"), "--episodes", str(eps),
                     "engram.write_policy=all"]) == 0
    printed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "recall_name_pairs.py"),
                              str(out)], capture_output=True, text=True, check=True).stdout
    rows = {int(c[0]): c for line in printed.splitlines()
            if line.startswith("| ") and line[2].isdigit()
            for c in [[x.strip() for x in line.strip("|").split("|")]]}
    assert sorted(rows) == [1, 2]
    assert rows[1][1:3] == ["1", "0"] and rows[2][1:3] == ["1", "1"]  # probes, with a pair
    by_distance = json.loads((out / "summary.json").read_text())["arms"]["on"]["by_tag"][
        "distance"]
    for d, cells in rows.items():
        assert float(cells[5]) == pytest.approx(by_distance[str(d)]["exact_match"], abs=5e-4)
