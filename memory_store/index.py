"""Vector index of one space (text embeddings or latent keys): scoped exact and ANN search.

The index is a *cache* of the LMDB vectors, rebuilt from them whenever it is missing, stale
(its recorded LMDB generation is older than the store's) or corrupt (a CRC32 in its manifest
does not match). Layout in memory:

* **base**: a float32 matrix with rows grouped by (namespace, session) in session order,
  memory-mapped from ``vecs-<gen>.npy`` after a save, with the 64-bit trace ids beside it and a
  ``(namespace, session) -> (start, stop)`` slice table. A session is one contiguous slice and
  "sessions before S" of a namespace is one contiguous run, so a scoped exact search scores
  exactly the rows in scope (no over-fetch, no post-filter).
* **delta**: rows added since the last save, with a per-row scope code; a scoped search scores
  only the delta rows whose code is in scope.
* **ann**: for kinds ``ivf`` and ``hnsw``, one ``faiss.IndexIDMap2`` per namespace with at least
  ``ann_min_rows`` rows (explicit ids, never positions). A scope larger than
  ``exact_max_rows`` is searched there; a partial scope uses an ``IDSelectorBitmap`` over the
  scope's ids inside FAISS. Search parameters (``nprobe``, ``ef_search``) are per call.

Scores: inner product for metric ``ip``; negative squared L2 distance for ``l2`` (higher is
always better). Saves are atomic: new files get generation-stamped names, are written to a
temp name, fsync'ed and renamed, then ``manifest.json`` is replaced (temp + rename).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

Key = tuple[str, str]  # (namespace, session)
SMALL_BATCH = 16  # query batches below this size run single-threaded (see _threads)


class _threads:
    """Run small query batches with one OpenMP thread: a few-millisecond search gains
    nothing from a thread team, and on a busy machine the team's barrier waits for a
    descheduled thread (a whole scheduler tick, ~4-8 ms). Restores the previous count."""

    def __init__(self, nq: int):
        self.one = nq < SMALL_BATCH

    def __enter__(self):
        if self.one:
            self.prev = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)

    def __exit__(self, *exc):
        if self.one:
            faiss.omp_set_num_threads(self.prev)
KINDS = ("flat", "ivf", "hnsw")


@dataclass
class IndexConfig:
    """Index settings of one store (both spaces). Stored in the LMDB meta at creation."""

    kind: str = "flat"
    metric: str = "ip"
    exact_max_rows: int = 20_000
    ann_min_rows: int = 50_000
    nlist: int = 0  # IVF lists; 0 = sqrt(rows), clipped to [8, 65536]
    hnsw_m: int = 32
    ef_construction: int = 80
    nprobe: int = 32
    ef_search: int = 128

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {KINDS}, got {self.kind!r}")
        if self.metric not in ("ip", "l2"):
            raise ValueError(f"metric: must be 'ip' or 'l2', got {self.metric!r}")
        for name in ("exact_max_rows", "ann_min_rows", "nlist"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name}: must be >= 0")
        for name in ("hnsw_m", "ef_construction", "nprobe", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be >= 1")


def file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of ``scores`` (nq, n) -> (scores, ids) sorted descending."""
    n = scores.shape[1]
    if n > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, 1)
        idx = ids[part] if ids.ndim == 1 else np.take_along_axis(ids, part, 1)
    else:
        idx = np.broadcast_to(ids, scores.shape) if ids.ndim == 1 else ids
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.take_along_axis(idx, order, 1)


class SpaceIndex:
    """Scoped vector search over one space; see the module docstring."""

    def __init__(self, dim: int, cfg: IndexConfig, generation: int = 0):
        self.dim, self.cfg, self.generation = dim, cfg, generation
        self.base_vecs = np.zeros((0, dim), np.float32)
        self.base_ids = np.zeros(0, np.int64)
        self.slices: dict[Key, tuple[int, int]] = {}
        self._dv: list[np.ndarray] = []
        self._di: list[np.ndarray] = []
        self._dc: list[np.ndarray] = []
        self._delta: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.codes: dict[Key, int] = {}
        self.delta_counts: dict[Key, int] = {}
        self.ann: dict[str, Any] = {}
        self.max_id = 0
        self.saved_generation = -1

    # ---- building -------------------------------------------------------------------
    @classmethod
    def from_sorted(cls, dim: int, cfg: IndexConfig, generation: int, vecs: np.ndarray,
                    ids: np.ndarray, slices: dict[Key, tuple[int, int]]) -> SpaceIndex:
        ix = cls(dim, cfg, generation)
        ix.base_vecs, ix.base_ids, ix.slices = vecs, ids.astype(np.int64), dict(slices)
        ix.max_id = int(ids.max()) if len(ids) else 0
        return ix

    @property
    def rows(self) -> int:
        return len(self.base_ids) + sum(len(i) for i in self._di)

    def add(self, vecs: np.ndarray, ids: np.ndarray, keys: list[Key], generation: int) -> None:
        """Append rows (already committed to LMDB) to the delta and to existing ANN indexes."""
        if len(ids):
            codes = np.empty(len(ids), np.int32)
            for j, key in enumerate(keys):
                c = self.codes.get(key)
                if c is None:
                    c = self.codes[key] = len(self.codes)
                codes[j] = c
                self.delta_counts[key] = self.delta_counts.get(key, 0) + 1
            self._dv.append(np.ascontiguousarray(vecs, np.float32))
            self._di.append(np.asarray(ids, np.int64))
            self._dc.append(codes)
            self._delta = None
            self.max_id = max(self.max_id, int(ids.max()))
            by_ns: dict[str, list[int]] = {}
            for j, (ns, _) in enumerate(keys):
                if ns in self.ann:
                    by_ns.setdefault(ns, []).append(j)
            for ns, rows in by_ns.items():
                r = np.asarray(rows)
                self.ann[ns].add_with_ids(np.ascontiguousarray(vecs[r]), ids[r].astype(np.int64))
        self.generation = generation

    def _delta_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._delta is None:
            if self._dv:
                self._delta = (np.concatenate(self._dv), np.concatenate(self._di),
                               np.concatenate(self._dc))
                self._dv, self._di, self._dc = [self._delta[0]], [self._delta[1]], [
                    self._delta[2]]
            else:
                self._delta = (np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64),
                               np.zeros(0, np.int32))
        return self._delta

    def keys_of(self, ns: str) -> list[Key]:
        return [k for k in set(self.slices) | set(self.delta_counts) if k[0] == ns]

    def scope_rows(self, keys: list[Key]) -> int:
        n = 0
        for key in keys:
            a, b = self.slices.get(key, (0, 0))
            n += b - a + self.delta_counts.get(key, 0)
        return n

    def all_rows(self) -> tuple[np.ndarray, np.ndarray, list[Key]]:
        """Every (vector, id, key) row: base then delta (used by saves and ANN builds)."""
        dv, di, dc = self._delta_arrays()
        inv = {c: k for k, c in self.codes.items()}
        keys: list[Key] = [None] * len(self.base_ids)  # type: ignore[list-item]
        for key, (a, b) in self.slices.items():
            keys[a:b] = [key] * (b - a)
        keys += [inv[int(c)] for c in dc]
        return (np.concatenate([self.base_vecs, dv]) if len(dv) else np.asarray(self.base_vecs),
                np.concatenate([self.base_ids, di]), keys)

    def _build_ann(self, ns: str, rows=None) -> None:
        vecs, ids, keys = rows if rows is not None else self.all_rows()
        sel = np.fromiter((k[0] == ns for k in keys), bool, len(keys))
        x, xi = np.ascontiguousarray(vecs[sel]), ids[sel]
        metric = faiss.METRIC_INNER_PRODUCT if self.cfg.metric == "ip" else faiss.METRIC_L2
        if self.cfg.kind == "ivf":
            nlist = self.cfg.nlist or int(np.clip(np.sqrt(len(x)), 8, 65536))
            nlist = max(1, min(nlist, len(x) // 39))  # faiss wants >= 39 points a list
            quant = faiss.IndexFlat(self.dim, metric)
            inner = faiss.IndexIVFFlat(quant, self.dim, nlist, metric)
            rng = np.random.default_rng(0)
            sample = x if len(x) <= 64 * nlist else x[rng.choice(len(x), 64 * nlist, False)]
            inner.train(sample)
        else:
            inner = faiss.IndexHNSWFlat(self.dim, self.cfg.hnsw_m, metric)
            inner.hnsw.efConstruction = self.cfg.ef_construction
        ann = faiss.IndexIDMap2(inner)  # faiss keeps a Python reference to ``inner``
        ann.add_with_ids(x, xi.astype(np.int64))
        self.ann[ns] = ann

    def ensure_ann(self) -> None:
        """Build missing ANN indexes for namespaces that reached ``ann_min_rows``."""
        if self.cfg.kind == "flat":
            return
        counts: dict[str, int] = {}
        for key in set(self.slices) | set(self.delta_counts):
            counts[key[0]] = counts.get(key[0], 0) + self.scope_rows([key])
        todo = [ns for ns, n in counts.items()
                if ns not in self.ann and n >= max(self.cfg.ann_min_rows, 1)]
        rows = self.all_rows() if todo else None
        for ns in todo:
            self._build_ann(ns, rows)

    # ---- search ---------------------------------------------------------------------
    def search(self, q: np.ndarray, keys: list[Key], k: int, *, exact: bool = False,
               nprobe: int | None = None, ef_search: int | None = None,
               whole_namespace: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the rows of ``keys`` (all of one namespace). Returns (scores, ids),
        shape (nq, k), padded with -inf / -1 when the scope holds fewer than k rows."""
        nq = q.shape[0]
        n_scope = self.scope_rows(keys)
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        if n_scope == 0 or k == 0:
            return out_s, out_i
        ns = keys[0][0]
        use_ann = (not exact and self.cfg.kind != "flat" and n_scope > self.cfg.exact_max_rows)
        if use_ann:
            self.ensure_ann()
        with _threads(nq):
            if use_ann and ns in self.ann:
                s, i = self._search_ann(q, keys, k, nprobe, ef_search, whole_namespace)
            else:
                s, i = self._search_exact(q, keys, k)
        out_s[:, : s.shape[1]], out_i[:, : i.shape[1]] = s, i
        return out_s, out_i

    def _knn(self, q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int):
        """Exact top-k of one contiguous block through faiss (its own threads, no numpy BLAS:
        mixing the two thread pools costs milliseconds of spinning per query)."""
        kk = min(k, len(x))
        metric = faiss.METRIC_INNER_PRODUCT if self.cfg.metric == "ip" else faiss.METRIC_L2
        d, i = faiss.knn(q, np.ascontiguousarray(x), kk, metric=metric)
        if self.cfg.metric == "l2":
            d = -d
        return d.astype(np.float32), ids[i]

    def _search_exact(self, q: np.ndarray, keys: list[Key], k: int):
        runs = sorted(self.slices[key] for key in keys if key in self.slices)
        merged: list[list[int]] = []
        for a, b in runs:
            if merged and merged[-1][1] == a:
                merged[-1][1] = b
            elif b > a:
                merged.append([a, b])
        cand_s, cand_i = [], []
        for a, b in merged:
            s, i = self._knn(q, self.base_vecs[a:b], self.base_ids[a:b], k)
            cand_s.append(s)
            cand_i.append(i)
        if any(self.delta_counts.get(key) for key in keys):
            dv, di, dc = self._delta_arrays()
            codes = np.fromiter((self.codes[key] for key in keys if key in self.codes), np.int32)
            rows = np.flatnonzero(np.isin(dc, codes))
            s, i = self._knn(q, dv[rows], di[rows], k)
            cand_s.append(s)
            cand_i.append(i)
        if len(cand_s) == 1:
            return cand_s[0], cand_i[0]
        return _topk(np.concatenate(cand_s, 1), np.concatenate(cand_i, 1), k)

    def scope_ids(self, keys: list[Key]) -> np.ndarray:
        parts = [self.base_ids[a:b] for a, b in (self.slices[x] for x in keys if x in self.slices)]
        if any(self.delta_counts.get(key) for key in keys):
            _, di, dc = self._delta_arrays()
            codes = np.fromiter((self.codes[key] for key in keys if key in self.codes), np.int32)
            parts.append(di[np.isin(dc, codes)])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _search_ann(self, q, keys, k, nprobe, ef_search, whole_namespace):
        ann = self.ann[keys[0][0]]
        bitmap = None
        sel = None
        if not whole_namespace:
            ids = self.scope_ids(keys)
            if self.max_id <= 64 * max(self.rows, 1) + (1 << 24):
                mask = np.zeros(self.max_id + 1, bool)
                mask[ids] = True
                bitmap = np.packbits(mask, bitorder="little")
                sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
            else:  # sparse explicit ids: a hash-set selector
                bitmap = np.ascontiguousarray(ids, np.int64)
                sel = faiss.IDSelectorBatch(len(bitmap), faiss.swig_ptr(bitmap))
        if self.cfg.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.cfg.nprobe), sel=sel)
        else:
            params = faiss.SearchParametersHNSW(efSearch=int(ef_search or self.cfg.ef_search),
                                                sel=sel)
        d, i = ann.search(np.ascontiguousarray(q), k, params=params)
        del bitmap
        d = d if self.cfg.metric == "ip" else -d
        d[i < 0] = -np.inf
        return d.astype(np.float32), i

    # ---- persistence ----------------------------------------------------------------
    def save(self, directory: str, order: dict[Key, int]) -> None:
        """Merge delta into base (sorted by ``order``, then id) and write atomically."""
        os.makedirs(directory, exist_ok=True)
        self.ensure_ann()
        vecs, ids, keys = self.all_rows()
        rank = np.fromiter((order.get(key, -1) for key in keys), np.int64, len(keys))
        keep = rank >= 0
        perm = np.lexsort((ids, rank))
        perm = perm[keep[perm]]
        vecs, ids = np.ascontiguousarray(vecs[perm]), ids[perm]
        skeys = [keys[p] for p in perm]
        slices: dict[Key, tuple[int, int]] = {}
        start = 0
        for j in range(1, len(skeys) + 1):
            if j == len(skeys) or skeys[j] != skeys[start]:
                slices[skeys[start]] = (start, j)
                start = j
        g = self.generation
        files: dict[str, int] = {}

        def put(name: str, write) -> None:
            final = os.path.join(directory, name)
            tmp = final + f".tmp{os.getpid()}"
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            files[name] = file_crc(tmp)
            os.replace(tmp, final)

        def save_npy(arr):
            def w(path):
                with open(path, "wb") as f:
                    np.save(f, arr)
            return w

        put(f"vecs-{g}.npy", save_npy(vecs))
        put(f"ids-{g}.npy", save_npy(ids))
        ann_files = {}
        for j, (ns, ann) in enumerate(sorted(self.ann.items())):
            name = f"ann-{g}-{j}.faiss"
            put(name, lambda p, a=ann: faiss.write_index(a, p))
            ann_files[ns] = name
        manifest = {"generation": g, "dim": self.dim, "kind": self.cfg.kind,
                    "metric": self.cfg.metric, "max_id": self.max_id, "files": files,
                    "ann": ann_files, "slices": [[k[0], k[1], a, b] for k, (a, b) in
                                                 slices.items()]}
        tmp = os.path.join(directory, f"manifest.json.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(directory, "manifest.json"))
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        for name in os.listdir(directory):
            if name != "manifest.json" and name not in files:
                try:
                    os.remove(os.path.join(directory, name))
                except OSError:
                    pass
        del vecs
        self.base_vecs = np.load(os.path.join(directory, f"vecs-{g}.npy"), mmap_mode="r")
        self.base_ids, self.slices = ids, slices
        self._dv, self._di, self._dc, self._delta = [], [], [], None
        self.codes, self.delta_counts = {}, {}
        self.saved_generation = g

    @classmethod
    def load(cls, directory: str, cfg: IndexConfig, dim: int) -> SpaceIndex | None:
        """Load a saved index, or None if it is missing, of another config, or corrupt."""
        path = os.path.join(directory, "manifest.json")
        try:
            with open(path) as f:
                m = json.load(f)
            if (m["dim"], m["kind"], m["metric"]) != (dim, cfg.kind, cfg.metric):
                return None
            for name, crc in m["files"].items():
                if file_crc(os.path.join(directory, name)) != crc:
                    return None
            g = m["generation"]
            vecs = np.load(os.path.join(directory, f"vecs-{g}.npy"), mmap_mode="r")
            ids = np.load(os.path.join(directory, f"ids-{g}.npy"))
            if vecs.shape != (len(ids), dim):
                return None
            ix = cls.from_sorted(dim, cfg, g, vecs, ids,
                                 {(a, b): (s, e) for a, b, s, e in m["slices"]})
            for ns, name in m["ann"].items():
                ix.ann[ns] = faiss.read_index(os.path.join(directory, name))
            ix.max_id = max(ix.max_id, int(m["max_id"]))
            ix.saved_generation = g
            return ix
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            return None
