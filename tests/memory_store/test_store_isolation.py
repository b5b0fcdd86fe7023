"""Isolation: no search ever returns a trace outside its scope.

* A hypothesis property over random multi-namespace stores, every index kind and every mode;
  it also checks that searches find what their scope holds (it cannot pass by returning
  nothing).
* A canary audit: every namespace holds a canary (a unique word and a unique latent key);
  searching any other namespace with it never returns it, while its own namespace always
  finds it first — before and after crash recovery, reindex (latent re-key), index rebuilds,
  compaction, upserts and deletes, and in a store imported from an export.
"""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_testlib import HashEmbedder, abandon

from memory_store import IndexConfig, Scope, Trace, TraceStore

WORDS = ["apple", "river", "stone", "music", "green", "cloud", "paper", "light"]


@st.composite
def stores(draw):
    n_ns = draw(st.integers(1, 3))
    rows = draw(st.lists(st.tuples(st.integers(0, n_ns - 1), st.integers(0, 3),
                                   st.lists(st.sampled_from(WORDS), min_size=1, max_size=4)),
                         min_size=1, max_size=60))
    kind = draw(st.sampled_from(["flat", "ivf", "hnsw"]))
    seed = draw(st.integers(0, 2**16))
    return rows, kind, seed


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=stores(), qwords=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3))
def test_no_search_leaves_its_scope(tmp_path_factory, data, qwords):
    rows, kind, seed = data
    rng = np.random.default_rng(seed)
    # ANN thresholds at 0 so approximate indexes are exercised even on tiny stores
    cfg = IndexConfig(kind=kind, exact_max_rows=0, ann_min_rows=0, nlist=2, nprobe=2)
    path = tmp_path_factory.mktemp("iso") / "s"
    with TraceStore.open(path, index=cfg, embedder=HashEmbedder(), latent_dim=4) as store:
        traces = [Trace(f"ns{n}", f"s{s}", " ".join(w), step=j,
                        latent_key=rng.normal(size=4).astype(np.float32))
                  for j, (n, s, w) in enumerate(rows)]
        ids = store.add(traces)
        where = {int(i): (t.namespace, t.session) for i, t in zip(ids, traces, strict=True)}
        words = {int(i): set(t.text.split()) for i, t in zip(ids, traces, strict=True)}
        q = " ".join(qwords)
        for ns in store.namespaces():
            order = [s.session for s in store.sessions(ns)]
            scopes = [Scope(ns), Scope(ns, tuple(order[:1])), Scope(ns, before=order[-1]),
                      Scope(ns, tuple(order[1::2]) or tuple(order[:1]))]
            for sc in scopes:
                allowed = ({(ns, s) for s in sc.sessions} if sc.sessions is not None else
                           {(ns, s) for s in (order[: order.index(sc.before)] if sc.before
                                              else order)})
                inside = [i for i, w in where.items() if w in allowed]
                matching = [i for i in inside if words[i] & set(qwords)]
                for mode in ("dense", "lexical", "hybrid"):
                    hits = store.search(q, sc, k=10, mode=mode)
                    for h in hits:
                        assert (h.namespace, h.session) in allowed
                        assert where[h.trace_id] == (h.namespace, h.session)
                    # not vacuous: dense returns min(k, scope) traces, lexical and hybrid at
                    # least every direct match (neighbouring turns' words count too)
                    if mode == "dense":
                        assert len(hits) == min(10, len(inside))
                    else:
                        assert len(hits) >= min(10, len(matching))
                s, i = store.search_latent(rng.normal(size=(3, 4)), sc, k=10, exact=True)
                assert (i >= 0).sum(1).tolist() == [min(10, len(inside))] * 3
                s, i = store.search_latent(rng.normal(size=(3, 4)), sc, k=10)
                for tid in i[i >= 0].tolist():
                    assert where[tid] in allowed
                if inside:
                    assert (i >= 0).any()
        if kind != "flat" and len(ids) > 0:
            assert store.search_paths("latent")[kind] > 0  # the ANN path really ran


N_NS = 12
DIM = 8


def _canaries(rng):
    keys = np.eye(DIM, dtype=np.float32)[rng.permutation(DIM)]
    out = []
    for n in range(N_NS):
        key = keys[n % DIM] * (1 + n)  # unique best inner-product match in its namespace
        out.append(Trace(f"tenant{n}", "secret", f"canary{n}zz the vault code", step=0,
                         latent_key=key, external_id=f"canary-{n}"))
    return out


def _filler(rng, n_per=30):
    return [Trace(f"tenant{n}", f"s{j % 3}", f"ordinary note {j} about the vault",
                  step=j + 1, latent_key=rng.normal(size=DIM).astype(np.float32) * 0.1)
            for n in range(N_NS) for j in range(n_per)]


def _audit(store, canaries, stage):
    for c in canaries:
        own = c.namespace
        for other in store.namespaces():
            scope = Scope(other)
            word = c.text.split()[0]
            found = []
            for mode in ("lexical", "hybrid", "dense"):
                found += [h.trace_id for h in store.search(word, scope, k=10, mode=mode)]
            for exact in (True, False):
                _, i = store.search_latent(c.latent_key, scope, k=10, exact=exact)
                found += i[i >= 0].tolist()
            cid = int(store.resolve(own, [c.external_id])[0])
            if other == own:
                lex = store.search(word, scope, k=1, mode="lexical")
                assert lex and lex[0].trace_id == cid, (stage, own)
                _, i = store.search_latent(c.latent_key, scope, k=1, exact=True)
                assert i[0, 0] == cid, (stage, own)
            else:
                owner = {int(store.resolve(x.namespace, [x.external_id])[0]) for x in canaries
                         if x.namespace != other}
                assert not set(found) & owner, (stage, c.namespace, other)


def test_canaries_never_cross_namespaces(tmp_path):
    rng = np.random.default_rng(11)
    cfg = IndexConfig(kind="ivf", exact_max_rows=20, ann_min_rows=20, nlist=2, nprobe=2)
    path = tmp_path / "s"
    emb = HashEmbedder()

    def opened():
        return TraceStore.open(path, index=cfg, embedder=emb, latent_dim=DIM)

    canaries = _canaries(rng)
    store = opened()
    store.add(_filler(rng))
    store.add(canaries)
    _audit(store, canaries, "written")
    store.flush()
    store.add(_filler(rng, 5))  # committed, never flushed
    abandon(store)  # crash
    store = opened()
    _audit(store, canaries, "crash recovery")
    ids = [i for ns in store.namespaces() for s in store.sessions(ns)
           for i in store._members(ns, s.session)]
    keys = np.stack([t.latent_key for t in store.get(ids)])
    store.update_latents(ids, keys[::-1].copy())  # reindex: keys shuffled across tenants...
    store.update_latents(ids, keys)  # ... and back
    _audit(store, canaries, "reindex")
    store.rebuild_index(kind="hnsw", exact_max_rows=20, ann_min_rows=20)
    _audit(store, canaries, "rebuild as hnsw")
    store.add([Trace(c.namespace, "secret", c.text, latent_key=c.latent_key,
                     external_id=c.external_id) for c in canaries])  # upsert every canary
    store.delete_session("tenant0", "s0")
    store.compact()
    _audit(store, canaries, "upsert, delete, compact")
    store.export(tmp_path / "dump.jsonl")
    store.close()
    with TraceStore.open(tmp_path / "copy", embedder=emb) as copy:
        copy.import_(tmp_path / "dump.jsonl")
        _audit(copy, canaries, "import")
