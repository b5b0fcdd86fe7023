"""Export (JSON lines + safetensors) and import: the copy holds the same traces and answers
every search exactly like the original; the safetensors file opens with the safetensors
library; a bad export line writes nothing."""

import json

import numpy as np
import pytest
from safetensors import safe_open
from store_testlib import random_traces

from memory_store import IndexConfig, InvalidInputError, Scope, TextConfig, Trace, TraceStore
from memory_store.transfer import vectors_path


def _fill(store, rng):
    tr = random_traces(rng, 80, namespaces=("a", "b"), sessions=3, dim=8)
    for j, t in enumerate(tr):
        t.external_id = f"x{j}" if j % 2 else None
        t.happened_at = f"2024-02-{1 + j % 27:02d}T10:{j % 60:02d}:00+01:00" if j % 3 else None
        t.meta["speaker"] = ["Ann", "Bob"][j % 2]
    tr[0].latent_value = np.arange(6, dtype=np.int16).reshape(3, 2)
    tr[1].latent_value = np.array([True, False])
    tr[2].latent_value = np.arange(4, dtype=">f4")
    store.add(tr)
    in_a = [t.external_id for t in tr if t.namespace == "a" and t.external_id]
    store.add([Trace("a", "s0", "a correction", external_id="fix", supersedes=in_a[0],
                      latent_key=np.ones(8, np.float32))])
    store.add([Trace("a", "s1", "rewritten", external_id=in_a[1],
                      latent_key=np.ones(8, np.float32))])  # version 2
    store.delete([5, 6])


def _searches(store, rng):
    out = []
    q_lat = rng.normal(size=(3, 8)).astype(np.float32)
    q_txt = rng.normal(size=(2, 32)).astype(np.float32)
    for ns in ("a", "b"):
        sessions = [s.session for s in store.sessions(ns)]
        for scope in (Scope(ns), Scope(ns, tuple(sessions[:1])), Scope(ns, before=sessions[-1]),
                      Scope(ns, since="2024-02-05", until="2024-02-20"),
                      Scope(ns, hide_superseded=True)):
            out.append(store.search_latent(q_lat, scope, k=7))
            out.append(store.search_vectors(q_txt, scope, k=7, space="text"))
            for mode in ("lexical", "hybrid", "dense"):
                for q in ("trace word3", "Ann trace 12"):
                    out.append([(h.trace_id, h.score) for h in store.search(q, scope, k=7,
                                                                             mode=mode)])
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tuple):
            np.testing.assert_array_equal(x[1], y[1])
            np.testing.assert_array_equal(x[0], y[0])
        else:
            assert x == y


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_export_import_round_trip_searches_identically(open_store, tmp_path, kind):
    rng = np.random.default_rng(7)
    cfg = IndexConfig(kind=kind, exact_max_rows=10, ann_min_rows=10, nlist=4, nprobe=4)
    src = open_store(latent_dim=8, index=cfg, text=TextConfig(bm25_k1=1.1))
    _fill(src, rng)
    out = tmp_path / "dump.jsonl"
    assert src.export(out) == len(src) == 79
    with safe_open(vectors_path(out), framework="numpy") as st:  # an independent reader
        assert st.get_tensor("latent_key").shape == (79, 8)
        assert set(st.keys()) >= {"latent_key", "text_embedding", "latent_value.<i2"}
    dst = open_store(path=tmp_path / "copy")
    ids = dst.import_(out)
    assert sorted(ids.tolist()) == sorted(i for ns in ("a", "b") for s in src.sessions(ns)
                                          for i in src._members(ns, s.session))
    assert dst.index_config == src.index_config and dst.text_config.bm25_k1 == 1.1
    all_ids = sorted(ids.tolist())
    for a, b in zip(src.get(all_ids), dst.get(all_ids), strict=True):
        assert a.to_json() == b.to_json()
        for f in ("latent_key", "text_embedding", "latent_value"):
            va, vb = getattr(a, f), getattr(b, f)
            assert (va is None) == (vb is None)
            if va is not None:
                np.testing.assert_array_equal(va, vb)
                assert va.dtype == vb.dtype
    assert [s.session for s in dst.sessions("a")] == [s.session for s in src.sessions("a")]
    _same(_searches(src, np.random.default_rng(1)), _searches(dst, np.random.default_rng(1)))
    assert dst.verify().ok


def test_partial_exports_and_streams(open_store, tmp_path):
    rng = np.random.default_rng(3)
    src = open_store(latent_dim=8)
    _fill(src, rng)
    assert src.export(tmp_path / "s.jsonl", namespace="a", sessions=["s0"]) == \
        len(src._members("a", "s0"))
    ext = src.get(src._members("a", src.sessions("a")[0].session))[-1].external_id
    assert src.export(tmp_path / "i.jsonl", namespace="a", ids=[ext, 2]) == 2
    with open(tmp_path / "t.jsonl", "w") as f:
        with pytest.raises(InvalidInputError, match="out"):
            src.export(f)
        assert src.export(f, with_vectors=False) == 79
    dst = open_store(path=tmp_path / "c")  # no vectors: text embeddings are recomputed
    assert len(dst.import_(tmp_path / "t.jsonl")) == 79
    assert dst.get([2])[0].latent_key is None and dst.get([2])[0].text_embedding is not None


def test_bad_import_writes_nothing(open_store, tmp_path):
    rng = np.random.default_rng(4)
    src = open_store(latent_dim=8)
    _fill(src, rng)
    out = tmp_path / "d.jsonl"
    src.export(out)
    lines = out.read_text().splitlines()
    bad = json.loads(lines[5])
    bad["happened_at"] = "5 May 2024"
    (tmp_path / "bad.jsonl").write_text("\n".join(lines[:5] + [json.dumps(bad)]) + "\n")
    (tmp_path / "bad.safetensors").write_bytes(open(vectors_path(out), "rb").read())
    dst = open_store(path=tmp_path / "c")
    with pytest.raises(InvalidInputError, match="happened_at"):
        dst.import_(tmp_path / "bad.jsonl")
    assert len(dst) == 0
    (tmp_path / "bad.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="missing"):
        dst.import_(tmp_path / "bad.jsonl")
    with pytest.raises(InvalidInputError, match="already in the store"):
        src.import_(out)
    assert len(dst) == 0 and len(src) == 79


def test_old_inline_export_still_imports(open_store, tmp_path):
    t = Trace("a", "s", "old style", latent_key=np.ones(3, np.float32), id=4)
    obj = t.to_json()
    obj["created"] = obj.pop("recorded_at")
    (tmp_path / "old.jsonl").write_text(json.dumps(obj) + "\n")
    store = open_store(path=tmp_path / "c")
    assert store.import_(tmp_path / "old.jsonl").tolist() == [4]
    np.testing.assert_array_equal(store.get([4])[0].latent_key, np.ones(3))
    TraceStore  # noqa: B018  (imported for the fixture's type)
