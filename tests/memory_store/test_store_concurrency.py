"""Many processes: 4 reader processes query while a writer ingests 50,000 traces and a
second writer waits for the lock; readers never fail, never see a torn or uncommitted trace,
never see the count go down, and the final count is exact. Threads sharing one store too."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from store_concurrency_worker import DIM, TDIM, text_of

from memory_store import Scope, Trace, TraceStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
N = 50_000


def _spawn(*args):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}")
    return subprocess.Popen([sys.executable, str(HERE / "store_concurrency_worker.py"),
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


@pytest.mark.slow
def test_four_reader_processes_while_a_writer_ingests(tmp_path):
    path = tmp_path / "store"
    readers = [_spawn("reader", path, seed) for seed in range(4)]
    writer = _spawn("writer", path, N, "big")
    assert writer.stdout.readline().strip() == "writing", writer.stderr.read()
    waiter = _spawn("writer", path, 2000, "late")  # blocks on the writer lock, then writes
    out, err = writer.communicate(timeout=600)
    assert writer.returncode == 0, err
    out, err = waiter.communicate(timeout=600)
    assert waiter.returncode == 0, err
    (tmp_path / "done").write_text("")
    reports = []
    for r in readers:
        out, err = r.communicate(timeout=600)
        assert r.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    with TraceStore.open(path, mode="r") as store:
        assert len(store) == N + 2000
        assert {s.count for s in store.sessions("big")} == {5000}
        committed = set()
        for ns in ("big", "late"):
            for s in store.sessions(ns):
                committed.update(store._members(ns, s.session))
        assert store.verify().ok
    for rep in reports:
        assert rep["errors"] == 0, rep["messages"]
        assert rep["queries"] >= 20 and rep["seen"]
        assert set(rep["seen"]) <= committed
        assert not rep["went_down"]
    # the readers really ran during the ingest: they saw many intermediate counts
    middle = {c for rep in reports for c in rep["counts"] if 0 < c < N}
    assert len(middle) >= 5, [rep["counts"][:10] for rep in reports]


def test_threads_share_one_store_while_it_writes(open_store, store_path):
    store = open_store(latent_dim=DIM)
    rng = np.random.default_rng(0)
    errors, stop = [], threading.Event()

    def read(seed):
        r = np.random.default_rng(seed)
        while not stop.is_set():
            try:
                if "t" not in store.namespaces():
                    continue
                _, ids = store.search_latent(r.normal(size=(3, DIM)), Scope("t"), k=5)
                for t in store.get([int(i) for i in ids.ravel() if i >= 0]):
                    assert t.text == text_of(t.namespace, t.step)
                store.search("word3", "t", k=3, mode="lexical")
            except Exception as e:
                errors.append(e)
                return

    threads = [threading.Thread(target=read, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for b in range(30):
        j = range(b * 50, (b + 1) * 50)
        store.add([Trace("t", f"s{b % 4}", text_of("t", x), step=x,
                         latent_key=rng.normal(size=DIM).astype(np.float32),
                         text_embedding=rng.normal(size=TDIM).astype(np.float32)) for x in j])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(store) == 1500 and store.verify().ok


def test_a_reader_follows_compaction(tmp_path):
    """A reader process keeps its store open while the writer deletes, compacts (new LMDB
    files) and writes again: it notices the new files and sees the writes after them."""
    path = tmp_path / "store"
    rng = np.random.default_rng(1)
    with TraceStore.open(path, latent_dim=DIM) as store:
        store.add([Trace("big", f"s{j % 3}", text_of("big", j), step=j,
                         latent_key=rng.normal(size=DIM).astype(np.float32),
                         text_embedding=rng.normal(size=TDIM).astype(np.float32))
                   for j in range(3000)])
    reader = _spawn("follow", path, 2000 + 500)
    assert reader.stdout.readline().split()[0] == "open"
    with TraceStore.open(path) as store:
        store.delete_session("big", "s0")
        store.compact()
        store.add([Trace("big", "s9", text_of("big", j), step=j,
                         latent_key=rng.normal(size=DIM).astype(np.float32),
                         text_embedding=rng.normal(size=TDIM).astype(np.float32))
                   for j in range(3000, 3500)])
    out, err = reader.communicate(timeout=300)
    assert reader.returncode == 0, err
    assert out.strip().splitlines()[-1] == "saw 2500", out
