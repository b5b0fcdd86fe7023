"""``retrievals.jsonl`` never names a trace of another namespace or of a later (or the same)
session: hypothesis over multi-namespace episode files whose namespaces share text, run
through the real store by the runner. What a retrieved trace is comes from the store's own
record, not from the runner's bookkeeping; the property fails if nothing is retrieved."""

import itertools
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.episodes import Episode, Probe, Session
from sessions.experiment import load_experiment
from sessions.pipeline import build_model
from sessions.runner import Arm, Runner
from sessions.runs import read_jsonl

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "experiments" / "smoke.yaml")
WORDS = ["locker", "code", "ferry", "alpha", "the", "is", "4829", "canary", "oslo", "blue"]
SENTENCE = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)


@st.composite
def episode_files(draw):
    n = draw(st.integers(2, 4))
    episodes = []
    for i in range(n):
        sessions = []
        for s in range(draw(st.integers(2, 4))):
            context = tuple(draw(st.lists(SENTENCE, min_size=0 if s else 1, max_size=3)))
            probes = tuple(Probe(draw(SENTENCE) + " ", draw(st.sampled_from(["4829", "blue"])))
                           for _ in range(draw(st.integers(0 if s else 0, 2))))
            sessions.append(Session(f"s{s}", context, probes if s else ()))
        if not any(sess.probes for sess in sessions[1:]):  # at least one probe that can read
            last = sessions[-1]
            sessions[-1] = Session(last.id, last.context, (Probe("the code is ", "4829"),))
        episodes.append(Episode(f"ns-{i}", tuple(sessions)))
    return episodes


EXP = load_experiment(SMOKE, ["eval.batch_size=2", "engram.write_policy=all"])
MODEL = build_model(EXP, "on")
with torch.no_grad():
    for reader in MODEL.readers.values():
        reader.gate_param.fill_(0.5)


@settings(max_examples=12, deadline=None)
@given(episode_files())
def test_retrievals_stay_in_scope(episodes):
    order = {(e.namespace, s.id): k for e in episodes for k, s in enumerate(e.sessions)}
    with tempfile.TemporaryDirectory() as tmp:
        Runner(MODEL, Arm.parse("on"), EXP, Path(tmp), torch.device("cpu"),
               progress=False).run(episodes)
        rows = read_jsonl(Path(tmp) / "retrievals.jsonl")
    assert rows, "no probe was scored"
    seen = list(itertools.chain.from_iterable(r["traces"] for r in rows))
    assert seen, "nothing was retrieved: the property would hold vacuously"
    for r in rows:
        for t in r["traces"]:
            assert t["namespace"] == r["namespace"], (r, t)
            assert order[(t["namespace"], t["session"])] < r["index"], (r, t)
