"""The episodes protocol: JSONL round trip (hypothesis), and every kind of bad file raises
``EpisodeFileError`` naming the line and the field."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sessions.episodes import (
    Episode,
    EpisodeFileError,
    Probe,
    Session,
    read_episodes,
    segment_id,
    write_episodes,
)

NAME = st.from_regex(r"[a-z0-9][a-z0-9._:-]{0,10}", fullmatch=True)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda t: t.strip())


@st.composite
def episodes(draw):
    out = []
    for ns in draw(st.lists(NAME, min_size=1, max_size=3, unique=True)):
        sessions, earlier = [], []
        for sid in draw(st.lists(NAME, min_size=1, max_size=3, unique=True)):
            context = tuple(draw(st.lists(TEXT, max_size=3)))
            probes = tuple(Probe(draw(TEXT), draw(TEXT),
                                 tuple(draw(st.lists(st.sampled_from(earlier), max_size=2)))
                                 if earlier else (), {"k": draw(st.integers(0, 3))})
                           for _ in range(draw(st.integers(0, 2))))
            sessions.append(Session(sid, context, probes, draw(st.sampled_from(
                [None, "2024-05-01", "2023-01-02T10:00:00"]))))
            earlier += [segment_id(sid, j) for j in range(len(context))]
        out.append(Episode(ns, tuple(sessions)))
    return out


@settings(max_examples=40, deadline=None)
@given(episodes())
def test_jsonl_round_trip(tmp_path_factory, eps):
    path = tmp_path_factory.mktemp("eps") / "e.jsonl"
    write_episodes(path, eps)
    assert read_episodes(path) == eps


GOOD = {"namespace": "alice", "sessions": [
    {"id": "s1", "context": ["my code is 1234."], "probes": []},
    {"id": "s2", "context": [], "probes": [{"prompt": "my code is ", "answer": "1234",
                                            "evidence": ["s1/0"]}]}]}


def _bad(**patch):
    obj = json.loads(json.dumps(GOOD))
    for path, value in patch.items():
        node, keys = obj, path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is KeyError:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return obj


@pytest.mark.parametrize("obj,field", [
    (_bad(namespace="has space"), "namespace"),
    (_bad(namespace=KeyError), "namespace"),
    (_bad(sessions=[]), "sessions"),
    (_bad(sessions__0__id="s2"), "sessions[1].id"),
    (_bad(sessions__0__context=["ok", ""]), "sessions[0].context[1]"),
    (_bad(sessions__1__probes__0__answer=""), "sessions[1].probes[0].answer"),
    (_bad(sessions__1__probes__0__prompt=7), "sessions[1].probes[0].prompt"),
    (_bad(sessions__1__probes__0__evidence=["s2/0"]), "sessions[1].probes[0].evidence[0]"),
    (_bad(sessions__1__date="yesterday"), "sessions[1].date"),
    (_bad(sessions__1__colour="red"), "sessions[1].colour"),
])
def test_bad_field_is_named_with_its_line(tmp_path, obj, field):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(GOOD) .replace('"alice"', '"bob"') + "\n\n" + json.dumps(obj)
                    + "\n")
    with pytest.raises(EpisodeFileError) as err:
        read_episodes(path)
    assert f"{path}:3: {field}" in str(err.value)


def test_bad_json_duplicate_namespace_and_empty_file(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(EpisodeFileError, match=r"e.jsonl:2: not valid JSON"):
        read_episodes(path)
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(EpisodeFileError, match=r"e.jsonl:2: namespace: 'alice' is already used"):
        read_episodes(path)
    path.write_text("\n")
    with pytest.raises(EpisodeFileError, match="empty"):
        read_episodes(path)
    with pytest.raises(FileNotFoundError):
        read_episodes(tmp_path / "missing.jsonl")
