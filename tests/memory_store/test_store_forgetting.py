"""Deletes: by id, external id, session, namespace. Property: after a delete no search ever
returns the trace again, through flushes, reopens, simulated crashes, index rebuilds, latent
re-keys (reindex) and compaction, on every index kind; ``compact`` gives disk space back."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_testlib import HashEmbedder, abandon

from memory_store import (
    IndexConfig,
    InvalidInputError,
    Scope,
    Trace,
    TraceStore,
    UnknownTraceError,
)

DIM = 4
OPS = ["add", "add", "upsert", "delete_ids", "delete_external", "delete_session",
       "delete_namespace", "flush", "reopen", "crash", "rebuild", "reindex", "compact"]


def _trace(rng, j, ns, session, ext=None):
    return Trace(ns, session, f"word{j} canary{j}", step=j,
                 latent_key=rng.normal(size=DIM).astype(np.float32), external_id=ext)


def _check(store, alive, gone, rng):
    """Every alive trace is found, no deleted one ever is (latent, dense, lexical)."""
    assert len(store) == len(alive)
    for ns in {a[0] for a in alive.values()} | {"n0", "n1"}:
        want = {i for i, a in alive.items() if a[0] == ns}
        if not want:
            assert ns not in store.namespaces()
            continue
        q = rng.normal(size=(2, DIM)).astype(np.float32)
        for exact in (True, False):
            _, ids = store.search_latent(q, Scope(ns), k=len(alive) + 5, exact=exact)
            got = set(ids[ids >= 0].tolist())
            assert not got & gone
            assert got <= want
            if exact:
                assert got == want  # nothing alive is lost either (not vacuous)
        for i in list(want)[:3]:
            word = f"canary{alive[i][2]}"
            hits = store.search(word, Scope(ns), k=5, mode="lexical")
            assert hits and hits[0].trace_id == i
        for j in list(gone)[:5]:
            for mode in ("lexical", "hybrid"):
                assert all(h.trace_id not in gone for h in
                           store.search(f"canary{j} word{j}", Scope(ns), k=20, mode=mode))


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(OPS), min_size=4, max_size=14),
       kind=st.sampled_from(["flat", "ivf", "hnsw"]), seed=st.integers(0, 2**16))
def test_deleted_traces_never_come_back(tmp_path_factory, ops, kind, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("forget") / "s"
    cfg = IndexConfig(kind=kind, exact_max_rows=0, ann_min_rows=0, nlist=2, nprobe=2,
                      hnsw_m=8, ef_construction=16)
    emb = HashEmbedder()

    def reopen():
        return TraceStore.open(path, index=cfg, embedder=emb, latent_dim=DIM)

    store = reopen()
    alive: dict[int, tuple[str, str, int]] = {}  # id -> (ns, session, j)
    ext_of: dict[int, str] = {}
    gone: set[int] = set()
    j = 0
    for op in ["add"] + ops:
        if op in ("add", "upsert"):
            batch = []
            for _ in range(int(rng.integers(1, 12))):
                ns, s = f"n{rng.integers(2)}", f"s{rng.integers(3)}"
                ext = f"e{j}" if rng.random() < 0.5 else None
                if op == "upsert" and ext_of:
                    old = sorted(ext_of)[int(rng.integers(len(ext_of)))]
                    if any(t.external_id == ext_of[old] for t in batch):
                        continue
                    ns, s, ext = alive[old][0], alive[old][1], ext_of[old]
                batch.append(_trace(rng, j, ns, s, ext))
                j += 1
            ids = store.add(batch)
            for i, t in zip(ids.tolist(), batch, strict=True):
                alive[i] = (t.namespace, t.session, t.step)
                if t.external_id is not None:
                    ext_of[i] = t.external_id
        elif op == "delete_ids" and alive:
            pick = rng.choice(sorted(alive), size=min(len(alive), 3), replace=False).tolist()
            assert store.delete(pick) == len(pick)
            for i in pick:
                gone.add(i)
                alive.pop(i)
                ext_of.pop(i, None)
        elif op == "delete_external" and ext_of:
            i = sorted(ext_of)[0]
            assert store.delete([ext_of[i]], namespace=alive[i][0]) == 1
            gone.add(i)
            alive.pop(i)
            ext_of.pop(i)
        elif op == "delete_session" and alive:
            ns, s, _ = alive[sorted(alive)[0]]
            pick = [i for i, a in alive.items() if a[:2] == (ns, s)]
            assert store.delete_session(ns, s) == len(pick)
            for i in pick:
                gone.add(i)
                alive.pop(i)
                ext_of.pop(i, None)
        elif op == "delete_namespace" and alive:
            ns = alive[sorted(alive)[-1]][0]
            pick = [i for i, a in alive.items() if a[0] == ns]
            assert store.delete_namespace(ns) == len(pick)
            for i in pick:
                gone.add(i)
                alive.pop(i)
                ext_of.pop(i, None)
        elif op == "flush":
            store.flush()
        elif op == "reopen":
            store.close()
            store = reopen()
        elif op == "crash":
            abandon(store)
            store = reopen()
        elif op == "rebuild":
            store.rebuild_index()
        elif op == "reindex" and alive:
            pick = sorted(alive)[:4]
            store.update_latents(pick, rng.normal(size=(len(pick), DIM)).astype(np.float32))
        elif op == "compact":
            store.compact()
        _check(store, alive, gone, rng)
    assert store.verify().ok, str(store.verify())
    store.close()


def test_delete_by_external_id_and_errors_change_nothing(open_store):
    store = open_store(latent_dim=DIM)
    rng = np.random.default_rng(0)
    ids = store.add([_trace(rng, j, "u", "s1", f"note-{j}") for j in range(5)])
    with pytest.raises(UnknownTraceError, match="nope"):
        store.delete(["note-1", "nope"], namespace="u")
    with pytest.raises(UnknownTraceError):
        store.delete([ids[0], 999])
    with pytest.raises(InvalidInputError, match="namespace"):
        store.delete(["note-1"])
    assert len(store) == 5
    assert store.delete(["note-1", int(ids[2])], namespace="u") == 2
    assert len(store) == 3
    with pytest.raises(UnknownTraceError):
        store.resolve("u", ["note-1"])
    assert store.resolve("u", ["note-3"]).tolist() == [ids[3]]
    assert store.verify().ok


def test_compact_reclaims_disk(open_store, store_path):
    rng = np.random.default_rng(1)
    store = open_store(latent_dim=DIM)
    for b in range(4):
        tr = [_trace(rng, 1000 * b + j, "u", f"s{b}") for j in range(2500)]
        for t in tr:
            t.latent_value = rng.normal(size=(16,)).astype(np.float32)
        store.add(tr)
    store.flush()
    keep = store._members("u", "s3")
    for b in range(3):
        store.delete_session("u", f"s{b}")
    store.flush()

    def data_bytes():
        return os.path.getsize(store_path / "lmdb" / "data.mdb")
    before = data_bytes()
    res = store.compact()
    assert data_bytes() < before / 2 and res["bytes_after"] < res["bytes_before"]
    q = rng.normal(size=(1, DIM)).astype(np.float32)
    _, ids = store.search_latent(q, "u", k=3000, exact=True)
    assert set(ids[ids >= 0].tolist()) == set(keep)
    assert store.verify().ok
    store.close()
    with TraceStore.open(store_path, mode="r") as r:  # a fresh reader sees the same
        assert len(r) == 2500 and r.verify().ok
