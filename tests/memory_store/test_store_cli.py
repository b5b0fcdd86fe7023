"""The trace store CLI (``python -m memory_store`` / ``engram traces``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memory_store import TraceStore
from memory_store.cli import main

ROOT = Path(__file__).resolve().parents[2]

LINES = [
    {"namespace": "alice", "session": "mon", "text": "Bought a red bicycle today",
     "meta": {"speaker": "Alice"}},
    {"namespace": "alice", "session": "mon", "text": "The weather was rainy and cold",
     "time": "2024-01-01"},
    {"namespace": "alice", "session": "tue", "text": "Rode the bicycle to the lake",
     "trace_id": 100},
    {"namespace": "bob", "session": "x1", "text": "Bicycles are great exercise"},
]


@pytest.fixture
def ingested(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in LINES) + "\n")
    store = tmp_path / "store"
    assert main(["ingest", "--store", str(store), str(src), "--quiet"]) == 0
    assert "ingested 4 traces" in capsys.readouterr().out
    return store


def test_ingest_and_query(ingested, capsys):
    assert main(["query", "--store", str(ingested), "--namespace", "alice", "--json",
                 "--mode", "lexical", "bicycle"]) == 0
    res = json.loads(capsys.readouterr().out)
    # ids after an explicit trace_id continue above it; the rainy-weather turn matches
    # only through its context field (the previous turn), so it ranks last
    ids = [r["trace_id"] for r in res["results"]]
    assert set(ids[:2]) == {100, 101} and ids[2] == 102
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    assert set(res["results"][0]) == {"trace_id", "external_id", "session", "text", "score",
                                      "happened_at"}
    assert main(["query", "--store", str(ingested), "--namespace", "alice",
                 "--before-session", "tue", "bicycle"]) == 0
    out = capsys.readouterr().out
    assert "red bicycle" in out and "lake" not in out


def test_batch_queries(ingested, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps(x) for x in [
        {"id": "q1", "namespace": "alice", "text": "bicycle ride"},
        {"id": "q2", "namespace": "bob", "text": "bicycle"},
        {"namespace": "alice", "text": "weather", "sessions": ["mon"]},
        {"id": "q4", "namespace": "alice", "text": "lake", "before_session": "tue"}]) + "\n")
    assert main(["query", "--store", str(ingested), "--queries", str(q), "--k", "3"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2", 3, "q4"]
    assert {r["session"] for r in rows[0]["results"]} <= {"mon", "tue"}
    assert [r["text"] for r in rows[1]["results"]] == ["Bicycles are great exercise"]
    assert all(r["session"] == "mon" for r in rows[2]["results"] + rows[3]["results"])


def test_bad_line_reports_line_number_and_writes_nothing(ingested, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(LINES[0]) + "\n" + json.dumps({"namespace": "alice",
                                                             "session": "wed", "text": ""})
                   + "\n")
    with TraceStore.open(ingested, mode="r") as s:
        before = len(s)
    assert main(["ingest", "--store", str(ingested), str(src), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "empty" in err
    src.write_text("{oops\n")
    assert main(["ingest", "--store", str(ingested), str(src), "--quiet"]) == 2
    assert "line 1" in capsys.readouterr().err
    with TraceStore.open(ingested, mode="r") as s:
        assert len(s) == before and "wed" not in {x.session for x in s.sessions("alice")}


def test_list_show_stats_verify_export_delete(ingested, tmp_path, capsys):
    assert main(["list", "--store", str(ingested), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["namespace"]: r["traces"] for r in rows} == {"alice": 3, "bob": 1}
    assert main(["list", "--store", str(ingested), "--namespace", "alice"]) == 0
    out = capsys.readouterr().out
    assert out.index("mon") < out.index("tue")
    assert main(["show", "--store", str(ingested), "100"]) == 0
    assert "Rode the bicycle" in capsys.readouterr().out
    assert main(["show", "--store", str(ingested), "999"]) == 2
    assert "unknown trace id 999" in capsys.readouterr().err
    assert main(["stats", "--store", str(ingested), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["traces"] == 4
    assert main(["verify", "--store", str(ingested)]) == 0
    assert capsys.readouterr().out.startswith("OK")
    out_file = tmp_path / "exp.jsonl"
    assert main(["export", "--store", str(ingested), "--namespace", "alice", "--out",
                 str(out_file)]) == 0
    assert len(out_file.read_text().splitlines()) == 1 + 3  # a header line, then traces
    assert main(["delete", "--store", str(ingested), "--namespace", "alice", "--session",
                 "mon"]) == 0
    assert "2 traces" in capsys.readouterr().out
    assert main(["delete", "--store", str(ingested), "--namespace", "bob"]) == 0
    assert main(["list", "--store", str(ingested), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == [
        {"namespace": "alice", "sessions": 1, "traces": 1}]


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["stats", "--store", str(tmp_path / "nope")]) == 2
    assert "no such store" in capsys.readouterr().err


def test_python_dash_m_help():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "memory_store", "ingest", "--help"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "line number" in r.stdout


USER_LINES = [
    {"namespace": "conv-44", "session": "D1", "external_id": "conv-44/D1:1",
     "text": "I adopted a puppy named Biscuit", "happened_at": "2023-05-08T13:56:00"},
    {"namespace": "conv-44", "session": "D1", "external_id": "conv-44/D1:2",
     "text": "Biscuit loves the beach", "happened_at": "2023-05-08T14:00:00Z"},
    {"namespace": "conv-44", "session": "D2", "external_id": "conv-44/D2:1",
     "text": "We took Biscuit to the vet", "happened_at": "2023-06-20"},
    {"namespace": "conv-44", "session": "D3", "external_id": "conv-44/D3:1",
     "text": "Biscuit is actually a beagle, not a terrier", "happened_at": "2023-07-02",
     "supersedes": "conv-44/D1:1"},
]


def _query(store, capsys, *extra):
    assert main(["query", "--store", str(store), "--namespace", "conv-44", "--json",
                 *extra, "Biscuit"]) == 0
    return [r["external_id"] for r in json.loads(capsys.readouterr().out)["results"]]


def test_user_ids_upserts_time_filters_delete_export_import(tmp_path, capsys):
    """Acceptance, black box: string ids, idempotent re-ingest, happened_at filters,
    delete by session, export -> import -> identical search results."""
    src = tmp_path / "turns.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in USER_LINES) + "\n")
    store = tmp_path / "store"
    for _ in range(2):  # ingesting the same file twice leaves the same store
        assert main(["ingest", "--store", str(store), str(src), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ingested 4 traces" in out and "(0 new, 4 updated)" in out
    assert main(["stats", "--store", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["traces"] == 4
    assert main(["show", "--store", str(store), "--namespace", "conv-44", "conv-44/D1:2",
                 "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 2 and shown["happened_at"] == "2023-05-08T14:00:00+00:00"
    assert set(_query(store, capsys)) == {x["external_id"] for x in USER_LINES}
    assert set(_query(store, capsys, "--since", "2023-06-01")) == {"conv-44/D2:1",
                                                                   "conv-44/D3:1"}
    assert _query(store, capsys, "--until", "2023-05-08T13:59:00") == ["conv-44/D1:1"]
    assert "conv-44/D1:1" not in _query(store, capsys, "--hide-superseded")
    assert _query(store, capsys, "--newest-first", "--mode", "lexical")[0] in {
        "conv-44/D3:1", "conv-44/D2:1", "conv-44/D1:2"}
    assert main(["query", "--store", str(store), "--namespace", "conv-44", "--since",
                 "May 2023", "x"]) == 2
    assert "since" in capsys.readouterr().err
    before = {q: _query(store, capsys, *q) for q in [(), ("--mode", "lexical"),
                                                     ("--mode", "dense"), ("--since", "2023-06")]}
    dump = tmp_path / "dump.jsonl"
    assert main(["export", "--store", str(store), "--out", str(dump)]) == 0
    assert (tmp_path / "dump.safetensors").exists()
    copy = tmp_path / "copy"
    assert main(["import", "--store", str(copy), str(dump)]) == 0
    capsys.readouterr()
    for q, want in before.items():
        assert main(["query", "--store", str(copy), "--namespace", "conv-44", "--json", *q,
                     "Biscuit"]) == 0
        got = json.loads(capsys.readouterr().out)["results"]
        assert [r["external_id"] for r in got] == want
    assert main(["query", "--store", str(store), "--namespace", "conv-44", "--json",
                 "Biscuit"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == [
        r for r in json.loads(_json_query(copy, capsys))["results"]]
    assert main(["delete", "--store", str(store), "--namespace", "conv-44", "--session",
                 "D1"]) == 0
    assert "2 traces" in capsys.readouterr().out
    assert set(_query(store, capsys)) == {"conv-44/D2:1", "conv-44/D3:1"}
    assert main(["delete", "--store", str(store), "--namespace", "conv-44",
                 "conv-44/D2:1"]) == 0
    assert main(["show", "--store", str(store), "--namespace", "conv-44",
                 "conv-44/D2:1"]) == 2
    assert "unknown external id" in capsys.readouterr().err
    assert main(["compact", "--store", str(store)]) == 0
    assert main(["verify", "--store", str(store)]) == 0


def _json_query(store, capsys):
    assert main(["query", "--store", str(store), "--namespace", "conv-44", "--json",
                 "Biscuit"]) == 0
    return capsys.readouterr().out


def test_string_trace_id_gets_a_clear_error(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"namespace": "a", "session": "s", "text": "x",
                               "trace_id": "conv-44/D1:1"}) + "\n")
    assert main(["ingest", "--store", str(tmp_path / "s"), str(src), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "trace_id" in err and "external_id" in err


def test_second_writer_waits_with_wait_seconds(tmp_path, capsys):
    from memory_store import Trace
    store = tmp_path / "s"
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(LINES[0]) + "\n")
    with TraceStore.open(store, embedder=None) as holder:
        holder.add([Trace("a", "s", "held", text_embedding=[1.0] * 384)])
        assert main(["ingest", "--store", str(store), str(src), "--quiet", "--wait",
                     "0.3"]) == 2
        assert "after waiting 0.3 s" in capsys.readouterr().err
    assert main(["ingest", "--store", str(store), str(src), "--quiet", "--wait", "5"]) == 0
