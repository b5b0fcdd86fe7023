"""Approximate (FAISS) indexes of one namespace: build, scoped search, removal.

One FAISS index per namespace, always on explicit 64-bit trace ids (never positions): an
``IndexIVFFlat`` (kind ``ivf``; IVF lists store the ids themselves) or an ``IndexHNSWFlat``
inside an ``IndexIDMap2`` (kind ``hnsw``). A partial scope, a time
window or hidden (superseded) traces become an ID selector over the allowed ids, passed in the
search parameters, so FAISS itself skips everything else (no over-fetch, no post-filter).

Removal: IVF removes ids in place (``remove_ids``). HNSW graphs cannot drop nodes, so a
deleted id joins the namespace's ``dead`` set and every later search of that namespace passes
a selector of live ids; a trace whose vector is *replaced* (upsert, latent re-key) makes the
namespace's HNSW graph stale, and it is rebuilt on next use.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np


@dataclass
class NamespaceANN:
    index: faiss.Index
    kind: str  # "ivf" or "hnsw"
    dead: set[int] = field(default_factory=set)  # HNSW only: ids deleted since the build
    keep: object = None  # the IVF quantizer, kept alive beside its index


def metric_of(name: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if name == "ip" else faiss.METRIC_L2


def build(kind: str, dim: int, metric: str, x: np.ndarray, ids: np.ndarray, *, nlist: int,
          hnsw_m: int, ef_construction: int) -> NamespaceANN:
    x = np.ascontiguousarray(x, np.float32)
    m = metric_of(metric)
    if kind == "ivf":
        nlist = nlist or int(np.clip(np.sqrt(len(x)), 8, 65536))
        nlist = max(1, min(nlist, len(x) // 39))  # faiss wants >= 39 points a list
        quant = faiss.IndexFlat(dim, m)
        inner = faiss.IndexIVFFlat(quant, dim, nlist, m)
        rng = np.random.default_rng(0)
        sample = x if len(x) <= 64 * nlist else x[rng.choice(len(x), 64 * nlist, False)]
        inner.train(sample)
        out = NamespaceANN(inner, kind, keep=quant)
    else:
        inner = faiss.IndexHNSWFlat(dim, hnsw_m, m)
        inner.hnsw.efConstruction = ef_construction
        out = NamespaceANN(faiss.IndexIDMap2(inner), kind)  # faiss keeps ``inner`` alive
    if len(x):
        out.index.add_with_ids(x, np.ascontiguousarray(ids, np.int64))
    return out


def remove(ann: NamespaceANN, ids: np.ndarray) -> None:
    """Forget deleted ids (in place for IVF, a dead set for HNSW)."""
    if not len(ids):
        return
    if ann.kind == "ivf":
        arr = np.ascontiguousarray(ids, np.int64)
        ann.index.remove_ids(faiss.IDSelectorBatch(len(arr), faiss.swig_ptr(arr)))
    else:
        ann.dead.update(int(i) for i in ids)


def selector(allowed: np.ndarray, max_id: int, rows: int):
    """(selector, buffer to keep alive) letting exactly ``allowed`` ids through."""
    if max_id <= 64 * max(rows, 1) + (1 << 24):
        mask = np.zeros(max_id + 1, bool)
        mask[allowed] = True
        buf = np.packbits(mask, bitorder="little")
        return faiss.IDSelectorBitmap(len(buf), faiss.swig_ptr(buf)), buf
    buf = np.ascontiguousarray(allowed, np.int64)  # sparse explicit ids: a hash set
    return faiss.IDSelectorBatch(len(buf), faiss.swig_ptr(buf)), buf


def search(ann: NamespaceANN, q: np.ndarray, k: int, metric: str, allowed: np.ndarray | None,
           max_id: int, rows: int, nprobe: int, ef_search: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``q`` among ``allowed`` ids (None: the whole namespace)."""
    sel, buf = (None, None) if allowed is None else selector(allowed, max_id, rows)
    if ann.kind == "ivf":
        nlist = faiss.extract_index_ivf(ann.index).nlist
        params = faiss.SearchParametersIVF(nprobe=int(min(nprobe, nlist)), sel=sel)
    else:
        params = faiss.SearchParametersHNSW(efSearch=int(ef_search), sel=sel)
    d, i = ann.index.search(np.ascontiguousarray(q), k, params=params)
    del buf
    d = d if metric == "ip" else -d
    d[i < 0] = -np.inf
    return d.astype(np.float32), i
