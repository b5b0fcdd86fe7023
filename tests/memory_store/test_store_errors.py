"""Bad input: every case raises a typed error and leaves the store unchanged."""

import hashlib
import json
import os
import stat

import numpy as np
import pytest
from store_testlib import random_traces

from memory_store import (
    DimensionError,
    FormatVersionError,
    InvalidInputError,
    InvalidNameError,
    NonFiniteError,
    NotAStoreError,
    ReadOnlyError,
    Scope,
    StoreError,
    TextError,
    TimeFormatError,
    Trace,
    TraceStore,
    UnknownNamespaceError,
    UnknownSessionError,
    UnknownTraceError,
    WriterLockedError,
)


def fingerprint(path):
    """Bytes of every LMDB data file plus the index files' names and contents."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f in ("lock.mdb", "writer.lock"):
                continue
            h.update(f.encode())
            with open(os.path.join(root, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


@pytest.fixture
def filled(open_store, store_path):
    rng = np.random.default_rng(0)
    store = open_store(latent_dim=8)
    store.add(random_traces(rng, 40))
    store.flush()
    return store


def good(**kw):
    base = dict(namespace="a", session="s0", text="fine", latent_key=np.ones(8, np.float32))
    base.update(kw)
    return Trace(**base)


BAD_TRACES = [
    (dict(latent_key=np.ones(5)), DimensionError, "latent_key"),
    (dict(text_embedding=np.ones(7)), DimensionError, "text_embedding"),
    (dict(latent_key=np.full(8, np.nan)), NonFiniteError, "latent_key"),
    (dict(latent_key=np.r_[np.ones(7), np.inf]), NonFiniteError, "latent_key"),
    (dict(text_embedding=np.full(32, np.nan)), NonFiniteError, "text_embedding"),
    (dict(latent_value=np.array([1.0, np.nan])), NonFiniteError, "latent_value"),
    (dict(text=""), TextError, "text"),
    (dict(text="x" * 20_000), TextError, "text"),
    (dict(namespace="bad name"), InvalidNameError, "namespace"),
    (dict(session=""), InvalidNameError, "session"),
    (dict(id=1), InvalidInputError, "id"),  # id already taken
    (dict(id="conv-44/D1:1"), InvalidInputError, "id"),
    (dict(id=-3), InvalidInputError, "id"),
    (dict(external_id=""), InvalidInputError, "external_id"),
    (dict(external_id="é" * 200), InvalidInputError, "external_id"),
    (dict(external_id=12), InvalidInputError, "external_id"),
    (dict(happened_at="8 May 2023"), TimeFormatError, "happened_at"),
    (dict(happened_at="2023-02-30"), TimeFormatError, "happened_at"),
    (dict(supersedes=0), InvalidInputError, "supersedes"),
    (dict(step="3"), InvalidInputError, "step"),
    (dict(meta={"x": object()}), InvalidInputError, "meta"),
]


@pytest.mark.parametrize("bad,err,field", BAD_TRACES)
def test_bad_trace_in_batch_changes_nothing(filled, store_path, bad, err, field):
    before = fingerprint(store_path)
    export_before = [json.dumps(t.to_json()) for t in filled.get(range(1, 41))]
    with pytest.raises(err) as e:
        filled.add([good(), good(text="also fine"), good(**bad)])
    assert isinstance(e.value, StoreError) and str(e.value)
    assert e.value.field == field and field in str(e.value) and "trace 2" in str(e.value)
    assert fingerprint(store_path) == before
    assert len(filled) == 40
    assert [json.dumps(t.to_json()) for t in filled.get(range(1, 41))] == export_before
    assert filled.verify().ok


@pytest.mark.parametrize("call,err", [
    (lambda s: s.search("x", Scope("nope")), UnknownNamespaceError),
    (lambda s: s.search("x", Scope("a", ("nope",))), UnknownSessionError),
    (lambda s: s.search("x", Scope("a", before="nope")), UnknownSessionError),
    (lambda s: s.search_latent(np.ones(5), "a"), DimensionError),
    (lambda s: s.search_latent(np.full(8, np.nan), "a"), NonFiniteError),
    (lambda s: s.search("", "a"), InvalidInputError),
    (lambda s: s.search("x", "a", mode="fuzzy"), InvalidInputError),
    (lambda s: s.search("x", "a", k=0), InvalidInputError),
    (lambda s: s.search("x", "a b"), InvalidNameError),
    (lambda s: s.get([999]), UnknownTraceError),
    (lambda s: s.delete_session("a", "nope"), UnknownSessionError),
    (lambda s: s.delete_namespace("nope"), UnknownNamespaceError),
    (lambda s: s.update_latent_keys([1], np.ones((1, 3))), DimensionError),
    (lambda s: s.update_latent_keys([1, 2], np.ones((1, 8))), InvalidInputError),
    (lambda s: s.update_latent_keys([999], np.ones((1, 8))), UnknownTraceError),
    (lambda s: s.update_latent_keys([1], np.full((1, 8), np.inf)), NonFiniteError),
    (lambda s: s.export("/dev/null", namespace="nope"), UnknownNamespaceError),
    (lambda s: s.delete([999]), UnknownTraceError),
    (lambda s: s.delete(["no-such"], namespace="a"), UnknownTraceError),
    (lambda s: s.resolve("nope", ["x"]), UnknownTraceError),
    (lambda s: s.search("x", Scope("a", since="June")), TimeFormatError),
    (lambda s: s.search("x", Scope("a", since="2024-02-01", until="2024-01-01")),
     InvalidInputError),
    (lambda s: s.search("x", Scope("a", time_field="when")), InvalidInputError),
    (lambda s: s.update_latents([1], np.ones((1, 8)), meta={"x": float("nan")}),
     InvalidInputError),
])
def test_bad_calls_raise_typed_errors_and_change_nothing(filled, store_path, call, err):
    before = fingerprint(store_path)
    with pytest.raises(err):
        call(filled)
    assert fingerprint(store_path) == before


def test_import_with_bad_line_writes_nothing(filled, store_path, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(good(text="ok").to_json()) + "\n{not json\n")
    before = fingerprint(store_path)
    with pytest.raises(InvalidInputError, match="line 2"):
        filled.import_(src, keep_ids=False)
    assert fingerprint(store_path) == before


def test_not_a_store(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hello")
    with pytest.raises(NotAStoreError):
        TraceStore.open(tmp_path / "junk")
    assert os.listdir(tmp_path / "junk") == ["file.txt"]
    with pytest.raises(NotAStoreError):
        TraceStore.open(tmp_path / "missing", mode="r")
    with pytest.raises(NotAStoreError):
        TraceStore.open(tmp_path / "missing", create=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotAStoreError):
        TraceStore.open(tmp_path / "afile")


def test_newer_format_version(filled, store_path):
    filled.close()
    marker = store_path / "store.json"
    info = json.loads(marker.read_text())
    info["version"] += 1
    marker.write_text(json.dumps(info))
    before = fingerprint(store_path)
    with pytest.raises(FormatVersionError, match="newer|version"):
        TraceStore.open(store_path)
    assert fingerprint(store_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(filled, store_path):
    filled.close()
    os.chmod(store_path, stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ReadOnlyError):
            TraceStore.open(store_path)
    finally:
        os.chmod(store_path, stat.S_IRWXU)


def test_read_only_mode_refuses_writes(filled, store_path, embedder):
    with TraceStore.open(store_path, mode="r", embedder=embedder) as r:
        before = fingerprint(store_path)
        for call in (lambda: r.add([good()]), lambda: r.delete_namespace("a"),
                     lambda: r.update_latent_keys([1], np.ones((1, 8))),
                     lambda: r.rebuild_index()):
            with pytest.raises(ReadOnlyError):
                call()
        assert len(r.search("trace", "a", k=3)) == 3
        assert fingerprint(store_path) == before


def test_second_writer_gets_error_or_waits(filled, store_path):
    with pytest.raises(WriterLockedError):
        TraceStore.open(store_path)
    with pytest.raises(WriterLockedError):
        TraceStore.open(store_path, wait_for_lock=0.2)
    filled.close()
    with TraceStore.open(store_path, wait_for_lock=1.0) as again:
        assert len(again) == 40


def test_map_grows_instead_of_failing(open_store, tmp_path):
    rng = np.random.default_rng(0)
    store = open_store(path=tmp_path / "tiny", map_size=1 << 16, latent_dim=8)
    ids = []
    for _ in range(5):
        tr = random_traces(rng, 200)
        for t in tr:
            t.latent_value = rng.normal(size=(64,)).astype(np.float32)
        ids += store.add(tr).tolist()
    assert len(store) == 1000 and store._env.env.info()["map_size"] > 1 << 16
    assert store.get(ids[:1])[0].latent_value.shape == (64,)
    assert store.verify().ok


def test_config_validation_names_the_field():
    from memory_store import IndexConfig, TextConfig
    with pytest.raises(ValueError, match="kind"):
        IndexConfig(kind="lsh")
    with pytest.raises(ValueError, match="nprobe"):
        IndexConfig(nprobe=0)
    with pytest.raises(ValueError, match="default_mode"):
        TextConfig(default_mode="x")
    with pytest.raises(ValueError, match="bm25_b"):
        TextConfig(bm25_b=2)


def test_unwritable_directory_simulated(filled, store_path, monkeypatch):
    """As root the permission test above is skipped; simulate an unwritable directory."""
    filled.close()
    import memory_store.layout as layout

    real = os.access
    monkeypatch.setattr(layout.os, "access", lambda p, mode: False if mode == os.W_OK
                        else real(p, mode))
    before = fingerprint(store_path)
    with pytest.raises(ReadOnlyError, match="not writable"):
        TraceStore.open(store_path)
    with TraceStore.open(store_path, mode="r") as r:
        assert len(r) == 40 and r.verify().ok
    assert fingerprint(store_path) == before
