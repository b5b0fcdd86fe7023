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
