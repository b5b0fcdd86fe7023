"""Index kinds: approximate search against exact, per-call parameters, persistence."""

import json
import os

import numpy as np
import pytest
from store_testlib import random_traces

from memory_store import IndexConfig, Scope, TraceStore
from memory_store.index import SpaceIndex


def _clustered(rng, n, d, centers=20):
    c = rng.normal(size=(centers, d)).astype(np.float32) * 3
    return (c[rng.integers(centers, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("kind,params,min_recall", [
    ("ivf", {"nprobe": 16}, 0.9), ("hnsw", {"ef_search": 64}, 0.9)])
def test_approximate_recall_against_exact(open_store, kind, params, min_recall):
    rng = np.random.default_rng(0)
    cfg = IndexConfig(kind=kind, exact_max_rows=100, ann_min_rows=100, nlist=32)
    store = open_store(index=cfg, latent_dim=16)
    x = _clustered(rng, 3000, 16)
    tr = random_traces(rng, 3000, namespaces=("a",), sessions=6, dim=16)
    for t, v in zip(tr, x, strict=True):
        t.latent_key = v
    store.add(tr)
    q = _clustered(rng, 50, 16)
    for scope in (Scope("a"), Scope("a", before="s5")):
        _, exact = store.search_latent(q, scope, k=10, exact=True)
        _, approx = store.search_latent(q, scope, k=10, **params)
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact,
                                                                      strict=True)])
        assert recall >= min_recall, (kind, scope, recall)
        assert "a" in store._ix["latent"].ann  # the ANN index was really used


def test_per_call_params_do_not_leak(open_store):
    rng = np.random.default_rng(1)
    cfg = IndexConfig(kind="ivf", exact_max_rows=0, ann_min_rows=0, nlist=64, nprobe=64)
    store = open_store(index=cfg, latent_dim=16)
    tr = random_traces(rng, 2000, namespaces=("a",), sessions=2, dim=16)
    store.add(tr)
    q = rng.normal(size=(40, 16)).astype(np.float32)
    _, exact = store.search_latent(q, "a", k=10, exact=True)
    _, full = store.search_latent(q, "a", k=10)  # default nprobe = nlist: exhaustive
    _, low = store.search_latent(q, "a", k=10, nprobe=1)
    _, again = store.search_latent(q, "a", k=10)
    assert (full == exact).all() and (again == full).all()
    assert (low != exact).any()  # nprobe=1 really changed that one call


def test_reopen_uses_saved_index_without_rebuild(open_store, monkeypatch):
    rng = np.random.default_rng(2)
    store = open_store(latent_dim=8)
    store.add(random_traces(rng, 100))
    q = rng.normal(size=(3, 8))
    want = store.search_latent(q, "a", k=5)
    store.close()
    calls = []
    orig = TraceStore._build_index
    monkeypatch.setattr(TraceStore, "_build_index",
                        lambda self, *a: calls.append(a) or orig(self, *a))
    store = open_store()
    got = store.search_latent(q, "a", k=5)
    assert calls == []
    np.testing.assert_array_equal(got[1], want[1])


def _corrupt(path):
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        b = f.read(4)
        f.seek(-4, os.SEEK_END)
        f.write(bytes(x ^ 0xFF for x in b))


@pytest.mark.parametrize("damage", ["corrupt", "missing", "stale"])
def test_damaged_or_stale_index_is_rebuilt(open_store, store_path, damage, monkeypatch):
    rng = np.random.default_rng(3)
    store = open_store(latent_dim=8)
    store.add(random_traces(rng, 120))
    q = rng.normal(size=(4, 8))
    want = store.search_latent(q, "b", k=6)
    store.close()
    d = store_path / "index" / "latent"
    manifest = json.loads((d / "manifest.json").read_text())
    vec_file = d / f"vecs-{manifest['generation']}.npy"
    if damage == "corrupt":
        _corrupt(vec_file)
    elif damage == "missing":
        os.remove(vec_file)
    else:
        manifest["generation"] -= 1  # claims to reflect an older LMDB generation
        (d / "manifest.json").write_text(json.dumps(manifest))
    assert SpaceIndex.load(str(d), IndexConfig(), 8) is None or damage == "stale"
    calls = []
    orig = TraceStore._build_index
    monkeypatch.setattr(TraceStore, "_build_index",
                        lambda self, *a: calls.append(a) or orig(self, *a))
    store = open_store()
    got = store.search_latent(q, "b", k=6)
    np.testing.assert_array_equal(got[1], want[1])
    assert store.verify().ok
    if damage != "stale":
        assert calls  # detected and rebuilt


def test_reader_catches_up_with_writer(open_store, store_path, embedder):
    rng = np.random.default_rng(4)
    writer = open_store(latent_dim=8)
    first = random_traces(rng, 50)
    for t in first:
        t.latent_key = t.latent_key / np.linalg.norm(t.latent_key)
    writer.add(first)
    reader = open_store(mode="r")
    q = rng.normal(size=(2, 8))
    reader.search_latent(q, "a", k=3)
    more = random_traces(rng, 50, namespaces=("a",))
    for t in more:  # unit keys: each is its own best inner-product match
        t.latent_key = t.latent_key / np.linalg.norm(t.latent_key)
    ids = writer.add(more)
    s, i = reader.search_latent(np.stack([t.latent_key for t in more[:2]]), "a", k=1)
    assert i[:, 0].tolist() == ids[:2].tolist()
    writer.delete_session("a", more[0].session)
    s, i = reader.search_latent(more[0].latent_key, "a", k=100)
    assert not set(i[0].tolist()) & set(ids.tolist()[:1])


def test_rebuild_index_switches_kind(open_store):
    rng = np.random.default_rng(5)
    store = open_store(latent_dim=8)
    store.add(random_traces(rng, 300, namespaces=("a",)))
    q = rng.normal(size=(5, 8))
    _, exact = store.search_latent(q, "a", k=5)
    store.rebuild_index(kind="hnsw", exact_max_rows=0, ann_min_rows=0)
    assert store.index_config.kind == "hnsw" and "a" in store._ix["latent"].ann
    _, approx = store.search_latent(q, "a", k=5, ef_search=200)
    assert (approx == exact).mean() > 0.9
    store.close()
    with TraceStore.open(store.path, mode="r") as r:
        assert r.index_config.kind == "hnsw"
