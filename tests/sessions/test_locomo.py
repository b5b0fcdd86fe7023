"""The LoCoMo task: turns as segments with their session dates, evidence mapped to segment ids,
a split by conversation, pure episodes; end to end, the store holds every turn with its date
and external id, and evidence recall@k of the model and of the store's text search is counted
from what was logged (checked against the store searched again here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engram.config import EngramConfig
from engram.model import EngramModel
from memory_store.scope import Scope
from memory_store.store import TraceStore
from mhc.config import FFNConfig, ModelConfig
from sessions.experiment import EvalConfig, ExperimentConfig
from sessions.report import summarize
from sessions.runner import Arm, Runner
from sessions.tasks.locomo import DEFAULT_DATA, LocomoTask, normalise_evidence, parse_date

HAVE_DATA = Path(DEFAULT_DATA).is_file()


def test_dates_and_evidence_strings():
    assert parse_date("1:56 pm on 8 May, 2023") == "2023-05-08T13:56:00"
    assert parse_date("12:09 am on 13 September, 2023") == "2023-09-13T00:09:00"
    assert normalise_evidence(["D8:6; D9:17", "D", "D:11:26", "D8:6"]) == \
        ["D8:6", "D9:17", "D11:26"]
    with pytest.raises(ValueError, match="LoCoMo date"):
        parse_date("yesterday")


@pytest.mark.skipif(not HAVE_DATA, reason="LoCoMo dev data (../shared/data) not present")
def test_turns_sessions_and_evidence_follow_the_data():
    raw = {s["sample_id"]: s for s in json.loads(Path(DEFAULT_DATA).read_text())}
    task = LocomoTask()
    ep = task.episode("eval", 0, 0)
    sample = raw[task.eval[0]]
    conv = sample["conversation"]
    assert ep.namespace == f"locomo-{task.eval[0]}"
    assert ep.sessions[-1].id == "questions" and not ep.sessions[-1].context
    turn = conv["session_3"][4]
    s3 = next(s for s in ep.sessions if s.id == "s3")
    assert s3.context[4].startswith(f"{turn['speaker']}: {turn['text']}")
    assert s3.date == parse_date(conv["session_3_date_time"])
    q = next(p for p in ep.sessions[-1].probes if p.evidence)
    original = sample["qa"][q.tags["question"]]
    for dia, seg in zip(normalise_evidence(original["evidence"]), q.evidence, strict=False):
        n, j = map(int, dia[1:].split(":"))
        assert seg == f"s{n}/{j - 1}"
    # split by conversation; pure episodes
    train_names = {task.episode("train", 1, i).namespace.rsplit("-", 2)[0] for i in range(30)}
    assert train_names <= {f"locomo-{c}" for c in task.train}
    assert task.episode("train", 1, 5) == LocomoTask().episode("train", 1, 5)
    assert task.episode("train", 1, 5) != task.episode("train", 2, 5)
    with pytest.raises(ValueError, match="both train and eval"):
        LocomoTask(train=["conv-26"], eval=["conv-26"])


def _mini(tmp_path: Path) -> Path:
    """A LoCoMo-format file of two tiny conversations (same format as the dev data)."""
    def conv(a, b, facts):
        c = {"speaker_a": a, "speaker_b": b}
        for n, (date, turns) in enumerate(facts, 1):
            c[f"session_{n}"] = [{"speaker": a if j % 2 == 0 else b, "dia_id": f"D{n}:{j + 1}",
                                  "text": t} for j, t in enumerate(turns)]
            c[f"session_{n}_date_time"] = date
        return c
    samples = [
        {"sample_id": "conv-a", "conversation": conv("Ann", "Bo", [
            ("1:00 pm on 2 May, 2023", ["I adopted a grey cat named Pixel.", "Nice!",
                                        "My sister lives in Oslo."]),
            ("3:30 pm on 9 May, 2023", ["I started painting sunsets.", "Lovely."])]),
         "qa": [{"question": "What is the name of Ann's cat?", "answer": "Pixel",
                 "evidence": ["D1:1"], "category": 4},
                {"question": "What does Ann paint?", "answer": "sunsets",
                 "evidence": ["D2:1"], "category": 4},
                {"question": "Where does Ann's brother live?", "adversarial_answer": "Oslo",
                 "evidence": ["D1:3"], "category": 5}]},
        {"sample_id": "conv-b", "conversation": conv("Cy", "Di", [
            ("9:00 am on 1 June, 2022", ["We moved to Lisbon.", "Great news."])]),
         "qa": [{"question": "Where did Cy move?", "answer": "Lisbon", "evidence": ["D1:1"],
                 "category": 4}]}]
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(samples))
    return path


def test_store_and_recall_end_to_end(tmp_path):
    data = _mini(tmp_path)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=96,
                      ffn=FFNConfig(kind="dense", hidden=64))
    torch.manual_seed(0)
    model = EngramModel(cfg, EngramConfig(enabled=True, read_layers=[0], key_dim=16,
                                          value_dim=16, heads=2, write_policy="all", top_k=10))
    task = {"name": "locomo", "data": str(data), "train": ["conv-b"], "eval": ["conv-a"]}
    exp = ExperimentConfig(model=cfg, engram=model.cfg, task=task,
                           eval=EvalConfig(episodes=1, batch_size=1))
    ep = exp.make_task("eval").episode("eval", 0, 0)
    arm_dir = tmp_path / "on"
    Runner(model, Arm.parse("on"), exp, arm_dir, torch.device("cpu"), False).run([ep])
    store = TraceStore.open(arm_dir / "store", mode="r")
    try:
        traces = store.get([int(i) for i in store.resolve("locomo-conv-a", ["s1/0", "s2/0"])])
        assert [t.text for t in traces] == ["Ann: I adopted a grey cat named Pixel.",
                                            "Ann: I started painting sunsets."]
        assert traces[0].happened_at == pytest.approx(1683032400.0)  # 2023-05-02 13:00 UTC
        probes = [json.loads(x) for x in (arm_dir / "probes.jsonl").open()]
        again = {}
        for p in probes:  # the store's text search, run again independently
            hits = store.search(p["prompt"], Scope("locomo-conv-a", sessions=("s1", "s2")),
                                k=10)
            again[p["probe"]] = [h.external_id for h in hits]
    finally:
        store.close()
    assert all(p["text_retrieved"] == again[p["probe"]] for p in probes)
    assert any(p["text_retrieved"][0] in p["evidence"] for p in probes)  # the cat, at least
    summary = summarize(arm_dir)
    rec = summary["evidence_recall"]
    expected = sum(len(set(p["evidence"]) & set(again[p["probe"]][:1])) / len(p["evidence"])
                   for p in probes) / len(probes)
    assert rec["text search"]["@1"] == pytest.approx(expected, abs=1e-6)
    assert rec["layer 0"]["probes"] == 3 and "category" in rec["layer 0"]["by_tag"]
    layer = [json.loads(x) for x in (arm_dir / "retrievals.jsonl").open()]
    assert all(len(r["traces"]) == 5 for r in layer)  # top_k 10 > the 5 turns: all ranked
    assert rec["layer 0"]["@10"] == 1.0
