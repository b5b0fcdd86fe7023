"""TraceStore against the in-RAM dict model, through random operation sequences."""

import numpy as np
import pytest
from store_testlib import DictModel, random_traces

from memory_store import Scope, Trace, UnknownNamespaceError, UnknownSessionError


def check_against_model(store, model, rng, dim=8, k=5):
    assert len(store) == len(model.traces)
    ids = sorted(model.traces)
    got = store.get(ids)
    for t, i in zip(got, ids, strict=False):
        m = model.traces[i]
        assert (t.namespace, t.session, t.text, t.step, t.meta) == (
            m.namespace, m.session, m.text, m.step, m.meta)
        np.testing.assert_array_equal(t.latent_key, m.latent_key)
        np.testing.assert_array_equal(t.latent_value, m.latent_value)
        np.testing.assert_array_equal(t.text_embedding, m.text_embedding)
    assert sorted(store.namespaces()) == sorted(model.order)
    for ns, order in model.order.items():
        assert [s.session for s in store.sessions(ns)] == order
        scopes = [{}, {"sessions": order[:1]}, {"before": order[-1]}]
        for sc in scopes:
            for space, attr, d in (("latent", "latent_key", dim),
                                   ("text", "text_embedding", 32)):
                q = rng.normal(size=d).astype(np.float32)
                s, i = store.search_vectors(q, Scope(ns, **{x: tuple(v) if x == "sessions"
                                                            else v for x, v in sc.items()}),
                                            k, space=space)
                ms, mi = model.search(q, attr, ns, k, **sc)
                valid = i[0] >= 0
                np.testing.assert_array_equal(i[0][valid], mi)
                np.testing.assert_allclose(s[0][valid], ms, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_operations_match_dict_model(open_store, embedder, seed):
    rng = np.random.default_rng(seed)
    model = DictModel()
    store = open_store()
    for _ in range(12):
        op = rng.choice(["add", "add", "add", "delete_session", "delete_namespace", "update",
                         "reopen"])
        if op == "add":
            tr = random_traces(rng, int(rng.integers(1, 40)), namespaces=("a", "b", "c"),
                               sessions=4)
            ids = store.add(tr)
            assert ids.dtype == np.int64 and len(set(ids.tolist())) == len(tr)
            model.add(tr, ids)
        elif op == "delete_session" and model.order:
            ns = sorted(model.order)[rng.integers(len(model.order))]
            s = model.order[ns][rng.integers(len(model.order[ns]))]
            assert store.delete_session(ns, s) == model.delete_session(ns, s)
            if not model.order[ns]:
                del model.order[ns]
                store.delete_namespace(ns)
        elif op == "delete_namespace" and model.order:
            ns = sorted(model.order)[rng.integers(len(model.order))]
            assert store.delete_namespace(ns) == model.delete_namespace(ns)
        elif op == "update" and model.traces:
            ids = rng.choice(sorted(model.traces), size=min(5, len(model.traces)), replace=False)
            keys = rng.normal(size=(len(ids), 8)).astype(np.float32)
            store.update_latent_keys(ids, keys)
            for i, kk in zip(ids, keys, strict=False):
                model.traces[int(i)].latent_key = kk
        elif op == "reopen":
            store.close()
            store = open_store()
        check_against_model(store, model, rng)
    assert store.verify().ok


def test_ids_are_64bit_and_explicit_ids_work(open_store):
    store = open_store()
    big = 2**40 + 7
    ids = store.add([Trace("a", "s", "x", id=big), Trace("a", "s", "y")])
    assert ids.tolist() == [big, big + 1]
    assert store.get([big])[0].text == "x"
    # an explicit id below next_id is a non-append write: indexes must still be right
    ids2 = store.add([Trace("a", "s", "z", id=3)])
    assert ids2.tolist() == [3]
    hits = store.search("z", "a", k=3, mode="lexical")
    assert hits[0].trace_id == 3  # ("y" follows with "z" in its next-turn context field)
    assert store.verify().ok


def test_sessions_ordered_by_first_write_and_before_scope(open_store, embedder):
    store = open_store()
    for s in ["zeta", "alpha", "mid"]:
        store.add([Trace("n", s, f"note {s}")])
    store.add([Trace("n", "alpha", "again")])
    assert [s.session for s in store.sessions("n")] == ["zeta", "alpha", "mid"]
    assert [s.count for s in store.sessions("n")] == [1, 2, 1]
    hits = store.search("note", Scope("n", before="mid"), k=10, mode="lexical")
    assert {h.session for h in hits} == {"zeta", "alpha"}
    assert store.search("note", Scope("n", before="zeta"), k=10) == []
    with pytest.raises(UnknownSessionError):
        store.search("note", Scope("n", before="nope"))
    with pytest.raises(UnknownNamespaceError):
        store.search("note", Scope("other"))


def test_embeddings_computed_once_and_stored(open_store, embedder, store_path):
    store = open_store()
    store.add([Trace("n", "s", f"sentence number {i}") for i in range(10)])
    assert embedder.encoded == 10
    t = store.get([1])[0]
    np.testing.assert_allclose(t.text_embedding, embedder.encode(["sentence number 0"])[0])
    store.close()
    store = open_store()
    before = embedder.encoded
    store.rebuild_index()
    hits = store.search_vectors(t.text_embedding, "n", 1, space="text")
    assert hits[1][0, 0] == 1 and embedder.encoded == before  # nothing re-embedded


def test_document_uses_speaker_time_and_context(open_store, embedder):
    store = open_store()
    store.add([Trace("n", "s", "I adopted a puppy", meta={"speaker": "Ann", "time": "May"}),
               Trace("n", "s", "That is wonderful news", meta={"speaker": "Bob"})])
    # the reply is found by a word from the previous turn (lexical context field)
    hits = store.search("puppy", "n", k=2, mode="lexical")
    assert [h.trace_id for h in hits] == [1, 2]
    assert hits[0].score > hits[1].score
    assert store.search("Ann", "n", k=1, mode="lexical")[0].trace_id == 1


def test_batched_latent_search_with_per_query_scopes(open_store):
    rng = np.random.default_rng(3)
    store = open_store(latent_dim=8)
    tr = random_traces(rng, 200, namespaces=("a", "b"), sessions=5)
    ids = store.add(tr)
    model = DictModel()
    model.add(tr, ids)
    q = rng.normal(size=(6, 8)).astype(np.float32)
    scopes = [Scope("a"), Scope("b", ("s1", "s3")), Scope("a", before="s2"),
              Scope("b"), Scope("a", ("s4",)), Scope("b", before="s0")]
    s, i = store.search_latent(q, scopes, k=7)
    assert s.shape == i.shape == (6, 7)
    for j, sc in enumerate(scopes):
        ms, mi = model.search(q[j], "latent_key", sc.namespace, 7,
                              sessions=sc.sessions, before=sc.before)
        np.testing.assert_array_equal(i[j][: len(mi)], mi)
        assert (i[j][len(mi):] == -1).all() and np.isneginf(s[j][len(mi):]).all()


def test_export_import_roundtrip(open_store, tmp_path):
    rng = np.random.default_rng(7)
    src = open_store(latent_dim=8)
    tr = random_traces(rng, 60, namespaces=("a", "b"), sessions=3)
    tr[0].latent_value = np.arange(6, dtype=np.int16).reshape(3, 2)
    src.add(tr)
    out = tmp_path / "dump.jsonl"
    assert src.export(out) == 60
    dst = open_store(path=tmp_path / "copy")
    ids = dst.import_(out)
    assert sorted(ids.tolist()) == list(range(1, 61))
    for a, b in zip(src.get(range(1, 61)), dst.get(range(1, 61)), strict=True):
        assert (a.namespace, a.session, a.text, a.step, a.meta, a.recorded_at) == (
            b.namespace, b.session, b.text, b.step, b.meta, b.recorded_at)
        for f in ("latent_key", "text_embedding", "latent_value"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
            assert getattr(a, f).dtype == getattr(b, f).dtype
    assert [s.session for s in dst.sessions("a")] == [s.session for s in src.sessions("a")]
    assert dst.verify().ok


def test_latent_values_follow_search_ids(open_store):
    rng = np.random.default_rng(8)
    store = open_store(latent_dim=8)
    tr = random_traces(rng, 30, namespaces=("a",), sessions=2)
    tr[3].latent_value = None
    ids = store.add(tr)
    _, found = store.search_latent(rng.normal(size=(2, 8)), "a", k=40)  # padded with -1
    vals = store.latent_values(found)
    assert len(vals) == found.size
    by_id = {int(i): t for i, t in zip(ids, tr, strict=True)}
    for i, v in zip(found.reshape(-1).tolist(), vals, strict=True):
        if i < 0 or by_id[i].latent_value is None:
            assert v is None
        else:
            np.testing.assert_array_equal(v, by_id[i].latent_value)
