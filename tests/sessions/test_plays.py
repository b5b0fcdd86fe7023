"""The plays task: sessions from acts, a fixed split that never trains on a held-out work,
episodes as pure functions of their seed, labels by position, and the kNN anchor memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engram.backends import TraceBatch
from engram.knn_memory import KNNMemory, footprint_bytes
from sessions.experiment import load_experiment
from sessions.objectives import EpisodeObjective
from sessions.tasks.plays import HELD_OUT, PlaysTask, load_works, split_sessions, train_works

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """The prepared corpus: the repository's cache/ if prepared, else prepared here."""
    here = ROOT / "cache"
    if (here / "shakespeare" / "works").is_dir():
        return str(here)
    return str(tmp_path_factory.mktemp("cache"))


def test_split_sessions_acts_repeats_and_fallbacks():
    text = ("TITLE\n\nPERSONS\n\nACT I.\nScene I.\nHam.\nWho?\n\nACT I.\nScene II.\nmore\n"
            "Act 2.\nScene I.\nlater\nACT THIRD\nend\n")
    sessions = split_sessions(text)
    assert [s for s, _ in sessions] == ["act1", "act2", "act3"]
    assert sessions[0][1].startswith("TITLE") and "Scene II." in sessions[0][1]
    assert "".join(t for _, t in sessions) == text  # nothing lost, nothing repeated
    poem = "".join(f"line {i}\n\n" for i in range(50))
    parts = split_sessions(poem, n_parts=5)
    assert [s for s, _ in parts] == [f"part{k}" for k in range(1, 6)]
    assert "".join(t for _, t in parts) == poem


def test_held_out_works_never_in_training(cache):
    works = load_works(cache)
    assert len(HELD_OUT) >= 6 and set(HELD_OUT) <= set(works)
    assert not set(train_works(works)) & set(HELD_OUT)
    task = PlaysTask(cache=cache, window=4)
    held_text = {w: works[w] for w in HELD_OUT}
    train_text = [works[w] for w in train_works(works)]
    seen = set()
    for seed in (0, 7):
        for i in range(120):
            ep = task.episode("train", seed, i)
            work = ep.namespace.removeprefix("plays-").rsplit("-", 2)[0].replace("-", "_")
            seen.add(work)
            assert work not in HELD_OUT, ep.namespace
            for seg in (ep.sessions[0].context[0], ep.sessions[-1].context[-1]):
                assert any(seg in t for t in train_text)
    assert len(seen) > 20  # the draws cover the training works, not a few of them
    for i in range(2 * len(HELD_OUT)):
        ep = task.episode("eval", 0, i)
        work = HELD_OUT[i % len(HELD_OUT)]
        assert ep.namespace == f"plays-{work.replace('_', '-')}-{i // len(HELD_OUT)}"
        assert all(seg in held_text[work] for s in ep.sessions for seg in s.context)


def test_training_batches_come_from_training_works(cache):
    exp = load_experiment(ROOT / "configs/experiments/plays.yaml", [f"task.cache={cache}"])
    objective = EpisodeObjective(exp, seed=3)
    held = {w.replace("_", "-") for w in HELD_OUT}
    for step in range(30):
        for ep in objective.batch(step).episodes:
            assert not any(ep.namespace.startswith(f"plays-{w}-") for w in held)


def test_episodes_are_pure_functions_of_the_seed(cache):
    a, b = PlaysTask(cache=cache), PlaysTask(cache=cache)  # fresh memo: nothing carried over
    for split in ("train", "eval"):
        for i in (0, 5, 11):
            assert a.episode(split, 4, i) == b.episode(split, 4, i)
    assert a.episode("train", 4, 0) != a.episode("train", 5, 0)
    assert a.episode("eval", 4, 8) != a.episode("eval", 5, 8)  # another window of the work
    ep = a.episode("eval", 4, 0)
    assert all(len(s.context) == a.window for s in ep.sessions)
    assert all(len(seg.encode()) <= a.segment_bytes or "\n" not in seg.rstrip("\n")
               for s in ep.sessions for seg in s.context)


def test_byte_classes_mark_names_and_phrases_seen_earlier(cache):
    from sessions.episodes import Episode, Session

    ep = Episode("x", (Session("act1", ("Hamlet speaks to the ghost of the old king.\n",)),
                       Session("act2", ("Then Hamlet said: to the ghost of the old king!\n",))))
    classify = PlaysTask(cache=cache).byte_classifier(ep, 1)
    text = ep.sessions[1].context[0]
    labels = classify(text)
    assert len(labels) == len(text.encode())
    start = text.index("Hamlet")
    assert labels[start:start + 6] == ["name"] * 6
    assert labels[0] == "other"  # "Then" occurs only in this session
    phrase_end = text.index("old king") + len("old king") - 1
    assert labels[phrase_end] == "phrase"


def test_knn_memory_keeps_everything_and_reads_all():
    B, n, S, D, K = 2, 3, 5, 8, 4
    mem = KNNMemory(B, D, K, S)
    key = torch.nn.functional.normalize(torch.randn(B, n, K), dim=-1)
    batch = TraceBatch(key, torch.randn(B, n, S, D), torch.ones(B, n, S, dtype=torch.bool),
                       torch.randint(0, 256, (B, n, S)), torch.zeros(B, n))
    mem.write(batch, session=0, keep_Bn=torch.zeros(B, n, dtype=torch.bool))  # policy ignored
    mem.write(batch, session=1)
    cand = mem.retrieve(torch.randn(B, 7, K), session=torch.tensor([1, 2]), k=1)
    assert cand.selected_BTM[0].sum(-1).eq(n).all()  # session 1 reads session 0's three
    assert cand.selected_BTM[1].sum(-1).eq(2 * n).all()  # session 2 reads all six
    assert footprint_bytes(10, 2, D, K) == 10 * (D * 4 + 1) + 2 * (K + 2) * 4


def test_plays_ablation_end_to_end(tmp_path, cache):
    """The documented command's path: arms off, trained-off, on, knn on held-out works; the
    report pairs per-session bits/byte and lists what each memory holds."""
    from sessions.ablate import run_ablation

    exp = load_experiment(ROOT / "configs/experiments/plays.yaml", [
        f"task.cache={cache}", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
        "model.seq_len=64", "model.ffn.hidden=32", "model.ffn.n_domains=2",
        "model.ffn.n_components=2", "engram.key_dim=16", "engram.value_dim=16",
        "engram.heads=2", "task.segment_bytes=64", "task.window=2", "task.max_sessions=3",
        "eval_task.window=3", "train.steps=2", "train.batch_size=2", "train.eval_every=2",
        "train.log_every=1", "train.device=cpu", "eval.episodes=2", "eval.batch_size=2",
        "eval.backend=tensor", "ablate.arms=[off,trained-off,on,knn]"])
    result = run_ablation(exp, tmp_path, progress=False)
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"off", "trained-off", "on", "knn"}
    assert rows["knn"]["memory"]["tokens"] > rows["on"]["memory"]["tokens"] > 0
    assert "memory" not in rows["off"] or rows["off"]["memory"]["bytes"] == 0
    sessions = [json.loads(x) for x in (tmp_path / "seed0/knn/sessions.jsonl").open()]
    assert all(len(s["written"]) == s["segments"] for s in sessions)  # no write policy
    later = [s for s in sessions if s["index"] > 0]
    assert later and all(sum(v[1] for v in s["context_by_class"].values()) ==
                         s["context_bytes"] for s in later)
    text = (tmp_path / "ablation.md").read_text()
    assert "Against `trained-off`" in text and "Against `off`" in text and "95% CI" in text
    assert (tmp_path / "ablation.png").is_file()
