"""External ids (upsert, version, resolve), happened_at / recorded_at windows, newest-first
ties and supersedes, each against a plain-Python reference of the same rule."""

import datetime as dt

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memory_store import (
    InvalidInputError,
    Scope,
    TextConfig,
    TimeFormatError,
    Trace,
    UnknownTraceError,
)
from memory_store.timefmt import iso, parse_time

DIM = 4


def _unit(rng):
    v = rng.normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_upsert_keeps_id_counts_versions_and_replaces_content(open_store):
    store = open_store(latent_dim=DIM)
    rng = np.random.default_rng(0)
    first = [Trace("u", "s1", f"turn {j} about apples", step=j, external_id=f"s1/{j}",
                   latent_key=_unit(rng)) for j in range(4)]
    ids = store.add(first)
    again = [Trace("u", "s1", f"turn {j} about pears", step=j, external_id=f"s1/{j}",
                   latent_key=_unit(rng)) for j in range(4)]
    ids2 = store.add(again)
    assert ids2.tolist() == ids.tolist() and len(store) == 4
    got = store.get(ids)
    assert [t.version for t in got] == [2] * 4
    assert [t.text for t in got] == [t.text for t in again]
    np.testing.assert_array_equal(got[1].latent_key, again[1].latent_key)
    assert store.sessions("u")[0].count == 4
    # the old text is gone from every space, the new one found
    assert store.search("apples", "u", k=4, mode="lexical") == []
    assert {h.trace_id for h in store.search("pears", "u", k=4, mode="lexical")} == set(ids)
    _, hit = store.search_latent(again[2].latent_key, "u", k=1, exact=True)
    assert hit[0, 0] == ids[2]
    # moving a trace to another session by its external id moves its membership
    store.add([Trace("u", "s2", "moved", external_id="s1/3", latent_key=_unit(rng))])
    assert {s.session: s.count for s in store.sessions("u")} == {"s1": 3, "s2": 1}
    assert store.resolve("u", ["s1/3", "s1/0"]).tolist() == [ids[3], ids[0]]
    with pytest.raises(UnknownTraceError, match="nope"):
        store.resolve("u", ["nope"])
    assert store.verify().ok


@pytest.mark.parametrize("ext,field", [("", "external_id"), ("x" * 257, "external_id"),
                                       (7, "external_id")])
def test_bad_external_ids(open_store, ext, field):
    store = open_store()
    with pytest.raises(InvalidInputError) as e:
        store.add([Trace("u", "s", "fine"), Trace("u", "s", "bad", external_id=ext)])
    assert e.value.field == field and field in str(e.value) and "trace 1" in str(e.value)
    assert len(store) == 0


def test_external_id_limit_is_in_bytes(open_store):
    store = open_store()
    store.add([Trace("u", "s", "ok", external_id="é" * 128)])  # 256 bytes
    with pytest.raises(InvalidInputError, match="257 UTF-8 bytes"):
        store.add([Trace("u", "s", "no", external_id="é" * 128 + "x")])


def test_repeated_external_id_in_one_batch_is_an_error(open_store):
    store = open_store()
    with pytest.raises(InvalidInputError, match="repeats") as e:
        store.add([Trace("u", "s", "a", external_id="x"), Trace("u", "s", "b", external_id="x")])
    assert e.value.field == "external_id" and len(store) == 0


@settings(max_examples=60, deadline=None)
@given(st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1),
                    timezones=st.sampled_from([None, dt.timezone.utc,
                                               dt.timezone(dt.timedelta(hours=5, minutes=30))])))
def test_times_round_trip_through_iso_exactly(when):
    ts = parse_time(when, "happened_at")
    assert parse_time(iso(ts), "happened_at") == ts
    assert parse_time(when.isoformat(), "happened_at") == ts


@pytest.mark.parametrize("bad", ["8 May 2023", "2023-13-01", "yesterday", "", float("nan"),
                                 True, [2023]])
def test_bad_times_name_the_field_and_change_nothing(open_store, bad):
    store = open_store()
    store.add([Trace("u", "s", "before")])
    with pytest.raises(TimeFormatError) as e:
        store.add([Trace("u", "s", "x", happened_at=bad)])
    assert e.value.field == "happened_at" and "happened_at" in str(e.value)
    with pytest.raises(TimeFormatError) as e:
        Scope("u", since=bad)
    assert e.value.field == "since"
    assert len(store) == 1


def test_time_window_matches_a_reference_filter(open_store):
    store = open_store(latent_dim=DIM)
    rng = np.random.default_rng(1)
    days = [None] + [f"2023-05-{d:02d}" for d in range(1, 29)]
    traces = [Trace("u", f"s{j % 3}", f"event {j} walk", step=j, latent_key=_unit(rng),
                    happened_at=days[j % len(days)]) for j in range(90)]
    ids = store.add(traces)
    hap = {int(i): parse_time(t.happened_at, "h") for i, t in zip(ids, traces, strict=True)}
    rec = {t.id: t.recorded_at for t in store.get(ids)}
    q = rng.normal(size=(3, DIM)).astype(np.float32)
    windows = [("2023-05-03", "2023-05-10"), ("2023-05-20", None), (None, "2023-05-02"),
               ("2023-05-04T12:00", "2023-05-04T12:00")]
    for since, until in windows:
        lo, hi = parse_time(since, "s"), parse_time(until, "u")
        want = {i for i, h in hap.items() if h is not None and (lo is None or h >= lo)
                and (hi is None or h <= hi)}
        scope = Scope("u", since=since, until=until)
        for exact in (True, False):
            _, got = store.search_latent(q, scope, k=100, exact=exact)
            assert {int(i) for i in got[0] if i >= 0} == want
        lex = store.search("walk", scope, k=100, mode="lexical")
        assert {h.trace_id for h in lex} == want
        hyb = store.search("walk", scope, k=100)
        assert {h.trace_id for h in hyb} <= want and len(hyb) == len(want)
    assert store.search_paths("latent")["exact-filtered"] > 0
    # recorded_at: everything was recorded just now
    mid = max(rec.values())
    _, got = store.search_latent(q, Scope("u", until=mid, time_field="recorded_at"), k=100)
    assert len(got[0][got[0] >= 0]) == 90
    _, got = store.search_latent(q, Scope("u", since=mid + 1, time_field="recorded_at"), k=9)
    assert (got == -1).all()


def test_newest_first_orders_ties_by_time_and_is_exact_at_k(open_store):
    # bare documents (no neighbouring turns), so equal texts tie in every mode
    store = open_store(latent_dim=DIM, text=TextConfig(context_turns=0, next_turns=0,
                                                       dense_context_turns=0))
    key = np.array([1, 0, 0, 0], np.float32)
    days = [f"2023-01-{d:02d}" for d in (5, 1, 9, 3, 7, 2, 8, 4, 6)]
    ids = store.add([Trace("u", "s", "same words here", step=j, latent_key=key, happened_at=d)
                     for j, d in enumerate(days)])
    order = [int(i) for _, i in sorted(zip(days, ids.tolist(), strict=True), reverse=True)]
    _, got = store.search_latent(key, "u", k=3, exact=True, newest_first=True)
    assert got[0].tolist() == order[:3]
    hits = store.search("same words", "u", k=4, mode="lexical", newest_first=True)
    assert [h.trace_id for h in hits] == order[:4]
    hits = store.search("same words", "u", k=4, newest_first=True)
    assert [h.trace_id for h in hits] == order[:4]
    s, plain = store.search_latent(key, "u", k=3, exact=True)  # without it: any 3 of the tie
    assert set(plain[0].tolist()) <= set(ids.tolist()) and (s == s[0, 0]).all()


def test_supersedes_hides_the_corrected_trace(open_store):
    store = open_store(latent_dim=DIM)
    rng = np.random.default_rng(2)
    a = store.add([Trace("u", "s1", "I live in Paris", external_id="home",
                         latent_key=_unit(rng))])[0]
    b = store.add([Trace("u", "s2", "I moved: I live in Lisbon now", external_id="home2",
                         supersedes="home", latent_key=_unit(rng))])[0]
    c = store.add([Trace("u", "s3", "actually I live in Porto", supersedes=int(b),
                         latent_key=_unit(rng))])[0]
    assert store.get([b])[0].supersedes == a and store.get([c])[0].supersedes == b
    hidden = Scope("u", hide_superseded=True)
    assert {h.trace_id for h in store.search("live", "u", k=5, mode="lexical")} == {a, b, c}
    assert [h.trace_id for h in store.search("live", hidden, k=5, mode="lexical")] == [c]
    _, got = store.search_latent(rng.normal(size=DIM), hidden, k=5, exact=True)
    assert got[0][got[0] >= 0].tolist() == [c]
    store.delete([int(c)])  # the correction is gone: b is visible again
    assert [h.trace_id for h in store.search("live", hidden, k=5, mode="lexical")] == [b]
    with pytest.raises(UnknownTraceError, match="supersedes"):
        store.add([Trace("u", "s", "x", supersedes="missing")])
    store.add([Trace("v", "s", "other namespace")])
    with pytest.raises(InvalidInputError, match="supersedes") as e:
        store.add([Trace("v", "s", "x", supersedes=int(a))])
    assert e.value.field == "supersedes"
    assert store.verify().ok


WORDS = ["apple", "river", "stone", "music", "green", "cloud", "paper", "light", "Ann", "Bob"]


@settings(max_examples=15, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "add", "add", "upsert", "delete"]),
                              st.integers(0, 3), st.integers(1, 6)), min_size=2, max_size=12),
       seed=st.integers(0, 2**16))
def test_lexical_index_kept_up_to_date_equals_a_rebuild(tmp_path_factory, ops, seed):
    """The writer's cached BM25 index follows appends in place (and rebuilds after deletes
    or rewrites); every search equals that of an index built from scratch."""
    from store_testlib import HashEmbedder

    from memory_store import TraceStore
    rng = np.random.default_rng(seed)
    path = tmp_path_factory.mktemp("lex") / "s"
    emb = HashEmbedder()
    store = TraceStore.open(path, embedder=emb)
    j = 0
    for op, session, n in ops:
        if op == "delete" and len(store):
            live = [i for s in store.sessions("u") for i in store._members("u", s.session)]
            store.delete([live[int(rng.integers(len(live)))]])
        else:
            batch = []
            for _ in range(n):
                ext = f"e{int(rng.integers(j))}" if op == "upsert" and j else f"e{j}"
                if any(t.external_id == ext for t in batch):
                    continue
                batch.append(Trace("u", f"s{session}", " ".join(rng.choice(WORDS, 4)), step=j,
                                   external_id=ext, meta={"speaker": ["Ann", "Bob"][j % 2]}))
                j += 1
            store.add(batch)  # an upsert of a deleted external id makes a new trace
        if "u" not in store.namespaces():
            continue
        fresh = TraceStore.open(path, mode="r", embedder=emb)
        try:
            for q in ("apple river", "Ann music", "stone", "Bob paper cloud"):
                a = store.search(q, "u", k=8, mode="lexical")
                b = fresh.search(q, "u", k=8, mode="lexical")
                assert [h.trace_id for h in a] == [h.trace_id for h in b], q
                np.testing.assert_allclose([h.score for h in a], [h.score for h in b],
                                           rtol=1e-6)
                assert [h.trace_id for h in store.search(q, "u", k=8)] == \
                    [h.trace_id for h in fresh.search(q, "u", k=8)]
        finally:
            fresh.close()
    store.close()
