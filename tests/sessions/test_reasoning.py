"""The reasoning task: problems split by problem, episodes pure in their seed, training on the
reference solution, and — the point of the task — the trace the store holds is the model's own
generation (planted, and decoded for real and checked against an independent decoding)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from engram.config import EngramConfig
from engram.model import EngramModel
from memory_store.store import TraceStore
from mhc.config import FFNConfig, ModelConfig
from sessions.experiment import EvalConfig, ExperimentConfig
from sessions.objectives import EpisodeObjective
from sessions.runner import Arm, Runner
from sessions.tasks.reasoning import ReasoningTask, is_eval_problem, worked_solution


def test_worked_solution_is_right():
    for a, b in [(284, 637), (999, 999), (100, 100), (505, 495)]:
        steps, carries = worked_solution(a, b, 3)
        assert steps.endswith(f"answer: {a + b}")
        column = [int(x) for x in re.findall(r"=(\d+)", steps)]
        assert sum((c % 10) * 10 ** i for i, c in enumerate(column)) + \
            (column[-1] // 10) * 10 ** len(column) == a + b
        assert carries == sum(c >= 10 for c in column)


def test_split_by_problem_and_purity():
    task = ReasoningTask()
    seen = {"train": set(), "eval": set()}
    for split in seen:
        for i in range(150):
            ep = task.episode(split, 3, i)
            assert ep == ReasoningTask().episode(split, 3, i)  # pure: same seed, same episode
            for g in ep.sessions[0].generate:
                a, b = map(int, re.findall(r"\d+", g.prompt)[:2])
                assert is_eval_problem(a, b) == (split == "eval")
                seen[split].add(frozenset((a, b)))
    assert not seen["train"] & seen["eval"]
    assert task.episode("train", 3, 0) != task.episode("train", 4, 0)
    ep = task.episode("eval", 0, 1)
    for probe in ep.sessions[1].probes:  # rephrased: operands in the other order
        i = int(probe.evidence[0].split("/")[1])
        a, b = map(int, re.findall(r"\d+", ep.sessions[0].generate[i].prompt)[:2])
        assert probe.prompt.index(str(b)) < probe.prompt.index(str(a))
        assert probe.answer == str(a + b)


def _setup(tmp_path, episodes=2):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=96,
                      ffn=FFNConfig(kind="dense", hidden=64))
    torch.manual_seed(0)
    model = EngramModel(cfg, EngramConfig(enabled=True, read_layers=[0], key_dim=16,
                                          value_dim=16, heads=2, write_policy="all",
                                          max_trace_tokens=96))
    exp = ExperimentConfig(model=cfg, engram=model.cfg, task={"name": "reasoning"},
                           eval=EvalConfig(episodes=episodes, batch_size=episodes))
    task = exp.make_task("eval")
    eps = [task.episode("eval", 0, i) for i in range(episodes)]
    return model, exp, eps


def _stored(path):
    store = TraceStore.open(path, mode="r")
    try:
        out = {}
        for ns in store.namespaces():
            ids = store.resolve(ns, [f"s1/{i}" for i in range(3)])
            for t in store.get([int(i) for i in ids]):
                out[(ns, t.external_id)] = t.text
        return out
    finally:
        store.close()


def test_store_holds_the_planted_generation(tmp_path, monkeypatch):
    model, exp, eps = _setup(tmp_path)
    planted = {}

    def fake_generate(self, asks, rows, mem, s):
        out = []
        for g, r in zip(asks, rows, strict=True):
            text = f"units 9+9=18, answer: {len(planted)}{r}\n"  # not the reference
            planted[(eps[r].namespace, g.prompt)] = text
            out.append(text)
        return out

    monkeypatch.setattr(Runner, "generate", fake_generate)
    Runner(model, Arm.parse("on"), exp, tmp_path / "on", torch.device("cpu"), False).run(eps)
    stored = _stored(tmp_path / "on" / "store")
    assert len(stored) == 6
    for ep in eps:
        for i, g in enumerate(ep.sessions[0].generate):
            assert stored[(ep.namespace, f"s1/{i}")] == g.prompt + planted[(ep.namespace,
                                                                              g.prompt)]
            assert g.reference not in stored[(ep.namespace, f"s1/{i}")]


def _greedy(model, prompt: str, max_bytes: int, stop: str) -> str:
    """An independent decoding: one row, no batching, no memory (session 1 has none)."""
    seq = list(prompt.encode())
    out = b""
    with torch.no_grad():
        for _ in range(max_bytes):
            logits = model(torch.tensor([seq])).out.logits
            nxt = int(logits[0, -1].argmax())
            seq.append(nxt)
            out += bytes([nxt])
            if out.endswith(stop.encode()):
                break
    return out.decode("utf-8", "replace")


def test_store_holds_the_models_real_generation(tmp_path):
    model, exp, eps = _setup(tmp_path)
    Runner(model, Arm.parse("on"), exp, tmp_path / "on", torch.device("cpu"), False).run(eps)
    stored = _stored(tmp_path / "on" / "store")
    rows = [json.loads(x) for x in (tmp_path / "on" / "sessions.jsonl").open()]
    generated = {(r["namespace"], g["id"]): g for r in rows for g in r.get("generated", [])}
    assert len(generated) == 6
    for ep in eps:
        for i, g in enumerate(ep.sessions[0].generate):
            mine = _greedy(model, g.prompt, g.max_bytes, g.stop)
            assert generated[(ep.namespace, f"s1/{i}")]["text"] == mine
            assert stored[(ep.namespace, f"s1/{i}")] == g.prompt + mine
            assert generated[(ep.namespace, f"s1/{i}")]["exact"] == (mine.removesuffix(
                g.stop) == g.reference)


def test_training_writes_the_reference_solution():
    task = ReasoningTask()
    exp = ExperimentConfig(model=ModelConfig(seq_len=96), task={"name": "reasoning"})
    batch = EpisodeObjective(exp, seed=0).batch(0)
    ep = batch.episodes[0]
    g = task.episode("train", 0, 0).sessions[0].generate[0]
    assert ep.sessions[0].context[0] == g.prompt + g.reference + g.stop
    assert batch.ctx_rows.numel() == batch.seg_valid.sum()  # context LM loss: learn to write


@pytest.mark.parametrize("bad", [{"max_bytes": 0}, {"stop": 3}])
def test_bad_generate_field_is_a_clear_error(bad):
    from sessions.episodes import EpisodeFileError, episode_from_json

    obj = {"namespace": "a", "sessions": [{"id": "s1", "context": [], "probes": [],
                                           "generate": [{"prompt": "p", "reference": "r",
                                                         **bad}]}]}
    with pytest.raises(EpisodeFileError, match=r"sessions\[0\]\.generate\[0\]\."):
        episode_from_json(obj)
