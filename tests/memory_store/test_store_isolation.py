"""Property: no search ever returns a trace outside its scope (random multi-namespace stores)."""

import numpy as np
from conftest import HashEmbedder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    cfg = IndexConfig(kind=kind, exact_max_rows=0, ann_min_rows=0, nlist=2, nprobe=1)
    path = tmp_path_factory.mktemp("iso") / "s"
    with TraceStore.open(path, index=cfg, embedder=HashEmbedder(), latent_dim=4) as store:
        traces = [Trace(f"ns{n}", f"s{s}", " ".join(w), step=j,
                        latent_key=rng.normal(size=4).astype(np.float32))
                  for j, (n, s, w) in enumerate(rows)]
        ids = store.add(traces)
        where = {int(i): (t.namespace, t.session) for i, t in zip(ids, traces, strict=True)}
        q = " ".join(qwords)
        for ns in store.namespaces():
            order = [s.session for s in store.sessions(ns)]
            scopes = [Scope(ns), Scope(ns, tuple(order[:1])), Scope(ns, before=order[-1]),
                      Scope(ns, tuple(order[1::2]) or tuple(order[:1]))]
            for sc in scopes:
                allowed = ({(ns, s) for s in sc.sessions} if sc.sessions is not None else
                           {(ns, s) for s in (order[: order.index(sc.before)] if sc.before
                                              else order)})
                for mode in ("dense", "lexical", "hybrid"):
                    for h in store.search(q, sc, k=10, mode=mode):
                        assert (h.namespace, h.session) in allowed
                        assert where[h.trace_id] == (h.namespace, h.session)
                s, i = store.search_latent(rng.normal(size=(3, 4)), sc, k=10)
                for tid in i[i >= 0].tolist():
                    assert where[tid] in allowed
