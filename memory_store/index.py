"""Vector index of one space (text embeddings or latent keys): scoped exact and ANN search.

The index is a *cache* of the LMDB vectors, rebuilt from them whenever it is missing, corrupt
(a CRC32 in its manifest does not match) or older than the change log reaches (see
``changes.py``); otherwise it catches up by replaying the log. Layout in memory:

* **base**: a float32 matrix with rows grouped by (namespace, session) in session order,
  memory-mapped from ``vecs-<gen>.npy`` after a save, with the 64-bit trace ids, their
  ``recorded_at`` / ``happened_at`` times beside it and a ``(namespace, session) -> (start,
  stop)`` slice table. A session is one contiguous slice and "sessions before S" of a namespace
  is one contiguous run, so a scoped exact search scores exactly the rows in scope. Deleted or
  rewritten rows are marked dead (a mask) until the next save drops them.
* **delta**: rows added since the last save, with a per-row scope code; a scoped search scores
  only the delta rows whose code is in scope. Removing a delta row deletes it.
* **ann**: for kinds ``ivf`` and ``hnsw``, one FAISS index per namespace with at least
  ``ann_min_rows`` rows (``ann.py``). A scope larger than ``exact_max_rows`` is searched there.

A :class:`RowFilter` (time window, hidden ids) narrows a search further. It is applied inside
the search: exact search scores only the rows that pass (gathered), ANN search passes an ID
selector of them. ``path_counts`` counts which path each search took (``exact``,
``exact-filtered``, ``ivf``, ``hnsw``), so tests and benchmarks can assert the path.

Scores: inner product for metric ``ip``; negative squared L2 distance for ``l2`` (higher is
always better). Saves and loads (atomic, CRC-checked files) are in ``index_io.py``.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass

import faiss
import numpy as np

from . import ann as A

Key = tuple[str, str]  # (namespace, session)
SMALL_BATCH = 16  # query batches below this size run single-threaded (see _threads)
KINDS = ("flat", "ivf", "hnsw")
INDEX_FORMAT = 2


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


@dataclass(frozen=True)
class RowFilter:
    """Rows a search may return besides its sessions: a time window on ``field``
    (``happened_at`` rows without one never pass) and ids to hide (sorted int64)."""

    since: float | None = None
    until: float | None = None
    field: str = "happened_at"
    hidden: np.ndarray | None = None

    @property
    def active(self) -> bool:
        return (self.since is not None or self.until is not None
                or (self.hidden is not None and len(self.hidden) > 0))

    def mask(self, ids: np.ndarray, rec: np.ndarray, hap: np.ndarray) -> np.ndarray:
        t = hap if self.field == "happened_at" else rec
        ok = np.ones(len(ids), bool)
        if self.since is not None:
            ok &= t >= self.since
        if self.until is not None:
            ok &= t <= self.until
        if self.hidden is not None and len(self.hidden):
            ok &= ~np.isin(ids, self.hidden)
        return ok


NO_FILTER = RowFilter()


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
        self.base_rec = np.zeros(0, np.float64)
        self.base_hap = np.zeros(0, np.float64)
        self.slices: dict[Key, tuple[int, int]] = {}
        self.base_dead: np.ndarray | None = None  # bool mask, allocated on first removal
        self.dead_by_key: dict[Key, int] = {}
        self._base_sorted: tuple[np.ndarray, np.ndarray] | None = None
        self._starts: tuple[np.ndarray, list[Key]] | None = None
        self._delta = self._empty_delta()
        self._pending: list[tuple] = []
        self.codes: dict[Key, int] = {}
        self.delta_counts: dict[Key, int] = {}
        self.ann: dict[str, A.NamespaceANN] = {}
        self.max_id = 0
        self.saved_generation = -1
        self.path_counts: Counter = Counter()

    def _empty_delta(self):
        return (np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64),
                np.zeros(0, np.int32), np.zeros(0, np.float64), np.zeros(0, np.float64))

    # ---- building -------------------------------------------------------------------
    @classmethod
    def from_sorted(cls, dim: int, cfg: IndexConfig, generation: int, vecs: np.ndarray,
                    ids: np.ndarray, rec: np.ndarray, hap: np.ndarray,
                    slices: dict[Key, tuple[int, int]]) -> SpaceIndex:
        ix = cls(dim, cfg, generation)
        ix.base_vecs, ix.base_ids, ix.slices = vecs, ids.astype(np.int64), dict(slices)
        ix.base_rec, ix.base_hap = np.asarray(rec, np.float64), np.asarray(hap, np.float64)
        ix.max_id = int(ids.max()) if len(ids) else 0
        return ix

    @property
    def rows(self) -> int:
        return self.scope_rows(list(set(self.slices) | set(self.delta_counts)))

    def add(self, vecs: np.ndarray, ids: np.ndarray, keys: list[Key], rec: np.ndarray,
            hap: np.ndarray, generation: int) -> None:
        """Append rows (already committed to LMDB, ids not in the index) to the delta and to
        existing ANN indexes."""
        if len(ids):
            codes = np.empty(len(ids), np.int32)
            for j, key in enumerate(keys):
                c = self.codes.get(key)
                if c is None:
                    c = self.codes[key] = len(self.codes)
                codes[j] = c
                self.delta_counts[key] = self.delta_counts.get(key, 0) + 1
            self._pending.append((np.ascontiguousarray(vecs, np.float32),
                                  np.asarray(ids, np.int64), codes,
                                  np.asarray(rec, np.float64), np.asarray(hap, np.float64)))
            self.max_id = max(self.max_id, int(ids.max()))
            by_ns: dict[str, list[int]] = {}
            for j, (ns, _) in enumerate(keys):
                if ns in self.ann:
                    by_ns.setdefault(ns, []).append(j)
            for ns, rows in by_ns.items():
                r = np.asarray(rows)
                self.ann[ns].index.add_with_ids(np.ascontiguousarray(vecs[r]),
                                                ids[r].astype(np.int64))
        self.generation = generation

    def remove(self, ids: np.ndarray, generation: int | None = None,
               rewritten: bool = False, namespaces: set[str] | None = None) -> None:
        """Drop rows by id (ids not in the index are ignored). ``rewritten``: the ids come
        back with new vectors (upsert, re-key): HNSW graphs holding them are dropped.
        ``namespaces``: the namespaces the ids belong to, when known (fewer ANN indexes to
        touch)."""
        ids = np.unique(np.asarray(ids, np.int64))
        if len(ids) and len(self.base_ids):
            order, sorted_ids = self._sorted_base()
            pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
            hit = order[pos[sorted_ids[pos] == ids]]
            if self.base_dead is None:
                self.base_dead = np.zeros(len(self.base_ids), bool)
            hit = hit[~self.base_dead[hit]]
            self.base_dead[hit] = True
            starts, keys = self._slice_starts()
            for j, n in Counter(np.searchsorted(starts, hit, "right") - 1).items():
                self.dead_by_key[keys[j]] = self.dead_by_key.get(keys[j], 0) + n
        if len(ids):
            dv, di, dc, dr, dh = self._delta_arrays()
            gone = np.isin(di, ids)
            if gone.any():
                inv = {c: k for k, c in self.codes.items()}
                for c, n in Counter(dc[gone].tolist()).items():
                    self.delta_counts[inv[c]] -= n
                keep = ~gone
                self._delta = (dv[keep], di[keep], dc[keep], dr[keep], dh[keep])
        for ns in [ns for ns in self.ann if namespaces is None or ns in namespaces]:
            if rewritten and self.ann[ns].kind == "hnsw":
                del self.ann[ns]
            else:
                A.remove(self.ann[ns], ids)
        if generation is not None:
            self.generation = generation

    def _sorted_base(self) -> tuple[np.ndarray, np.ndarray]:
        if self._base_sorted is None:
            order = np.argsort(self.base_ids, kind="stable")
            self._base_sorted = (order, self.base_ids[order])
        return self._base_sorted

    def _slice_starts(self) -> tuple[np.ndarray, list[Key]]:
        if self._starts is None:
            items = sorted(self.slices.items(), key=lambda kv: kv[1][0])
            self._starts = (np.asarray([a for _, (a, _) in items], np.int64),
                            [k for k, _ in items])
        return self._starts

    def _delta_arrays(self):
        if self._pending:
            parts = [self._delta] + self._pending
            self._delta = tuple(np.concatenate([p[j] for p in parts]) for j in range(5))
            self._pending = []
        return self._delta

    def keys_of(self, ns: str) -> list[Key]:
        return [k for k in set(self.slices) | set(self.delta_counts) if k[0] == ns]

    def scope_rows(self, keys: list[Key]) -> int:
        n = 0
        for key in keys:
            a, b = self.slices.get(key, (0, 0))
            n += b - a - self.dead_by_key.get(key, 0) + self.delta_counts.get(key, 0)
        return n

    def all_rows(self) -> tuple[np.ndarray, np.ndarray, list[Key], np.ndarray, np.ndarray]:
        """Every live (vector, id, key, recorded_at, happened_at) row: base then delta."""
        dv, di, dc, dr, dh = self._delta_arrays()
        inv = {c: k for k, c in self.codes.items()}
        keys: list[Key] = [None] * len(self.base_ids)  # type: ignore[list-item]
        for key, (a, b) in self.slices.items():
            keys[a:b] = [key] * (b - a)
        live = None if self.base_dead is None else ~self.base_dead
        bv, bi, br, bh = self.base_vecs, self.base_ids, self.base_rec, self.base_hap
        if live is not None:
            bv, bi, br, bh = bv[live], bi[live], br[live], bh[live]
            keys = [k for k, ok in zip(keys, live.tolist(), strict=True) if ok]
        keys += [inv[int(c)] for c in dc]
        return (np.concatenate([bv, dv]) if len(dv) else np.asarray(bv),
                np.concatenate([bi, di]), keys, np.concatenate([br, dr]),
                np.concatenate([bh, dh]))

    def ensure_ann(self, only: str | None = None, rows=None) -> None:
        """Build missing ANN indexes for namespaces that reached ``ann_min_rows``
        (``rows``: ``all_rows()`` when the caller already has them)."""
        if self.cfg.kind == "flat":
            return
        counts: dict[str, int] = {}
        for key in set(self.slices) | set(self.delta_counts):
            if only is None or key[0] == only:
                counts[key[0]] = counts.get(key[0], 0) + self.scope_rows([key])
        todo = [ns for ns, n in counts.items()
                if ns not in self.ann and n >= max(self.cfg.ann_min_rows, 1)]
        if not todo:
            return
        vecs, ids, keys = (rows or self.all_rows())[:3]
        ns_of = np.asarray([k[0] for k in keys], dtype=object)
        for ns in todo:
            sel = ns_of == ns
            self.ann[ns] = A.build(self.cfg.kind, self.dim, self.cfg.metric, vecs[sel],
                                   ids[sel], nlist=self.cfg.nlist, hnsw_m=self.cfg.hnsw_m,
                                   ef_construction=self.cfg.ef_construction)

    # ---- search ---------------------------------------------------------------------
    def search(self, q: np.ndarray, keys: list[Key], k: int, *, exact: bool = False,
               nprobe: int | None = None, ef_search: int | None = None,
               whole_namespace: bool = False,
               filt: RowFilter = NO_FILTER) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the live rows of ``keys`` (all of one namespace) that pass ``filt``.
        Returns (scores, ids), shape (nq, k), padded with -inf / -1."""
        nq = q.shape[0]
        n_scope = self.scope_rows(keys)
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        if n_scope == 0 or k == 0:
            return out_s, out_i
        ns = keys[0][0]
        allowed = self.scope_ids(keys, filt) if filt.active else None
        n_allowed = n_scope if allowed is None else len(allowed)
        use_ann = (not exact and self.cfg.kind != "flat" and n_allowed > self.cfg.exact_max_rows)
        if use_ann:
            self.ensure_ann(ns)
        with _threads(nq):
            if use_ann and ns in self.ann:
                s, i = self._search_ann(q, keys, k, nprobe, ef_search, whole_namespace, filt,
                                        allowed)
                self.path_counts[self.ann[ns].kind] += 1
            else:
                s, i = self._search_exact(q, keys, k, filt)
                self.path_counts["exact-filtered" if filt.active else "exact"] += 1
        out_s[:, : s.shape[1]], out_i[:, : i.shape[1]] = s, i
        return out_s, out_i

    def _knn(self, q: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int):
        """Exact top-k of one contiguous block through faiss (its own threads, no numpy BLAS:
        mixing the two thread pools costs milliseconds of spinning per query)."""
        kk = min(k, len(x))
        d, i = faiss.knn(q, np.ascontiguousarray(x), kk, metric=A.metric_of(self.cfg.metric))
        if self.cfg.metric == "l2":
            d = -d
        return d.astype(np.float32), ids[i]

    def _runs(self, keys: list[Key]) -> list[tuple[int, int, bool]]:
        """Merged contiguous base runs of ``keys``: (start, stop, has dead rows)."""
        runs = sorted((self.slices[key], self.dead_by_key.get(key, 0) > 0)
                      for key in keys if key in self.slices)
        merged: list[list] = []
        for (a, b), dead in runs:
            if merged and merged[-1][1] == a:
                merged[-1][1] = b
                merged[-1][2] |= dead
            elif b > a:
                merged.append([a, b, dead])
        return [tuple(m) for m in merged]

    def _delta_rows(self, keys: list[Key], filt: RowFilter) -> np.ndarray:
        if not any(self.delta_counts.get(key) for key in keys):
            return np.zeros(0, np.int64)
        dv, di, dc, dr, dh = self._delta_arrays()
        codes = np.fromiter((self.codes[key] for key in keys if key in self.codes), np.int32)
        ok = np.isin(dc, codes)
        if filt.active:
            ok &= filt.mask(di, dr, dh)
        return np.flatnonzero(ok)

    def _search_exact(self, q: np.ndarray, keys: list[Key], k: int, filt: RowFilter):
        cand_s, cand_i = [], []
        for a, b, dead in self._runs(keys):
            if dead or filt.active:
                ok = np.ones(b - a, bool) if not dead else ~self.base_dead[a:b]
                if filt.active:
                    ok &= filt.mask(self.base_ids[a:b], self.base_rec[a:b], self.base_hap[a:b])
                rows = np.flatnonzero(ok) + a
                if len(rows):
                    s, i = self._knn(q, self.base_vecs[rows], self.base_ids[rows], k)
                    cand_s.append(s)
                    cand_i.append(i)
                continue
            s, i = self._knn(q, self.base_vecs[a:b], self.base_ids[a:b], k)
            cand_s.append(s)
            cand_i.append(i)
        rows = self._delta_rows(keys, filt)
        if len(rows):
            dv, di = self._delta[0], self._delta[1]
            s, i = self._knn(q, dv[rows], di[rows], k)
            cand_s.append(s)
            cand_i.append(i)
        if not cand_s:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if len(cand_s) == 1:
            return cand_s[0], cand_i[0]
        return _topk(np.concatenate(cand_s, 1), np.concatenate(cand_i, 1), k)

    def scope_ids(self, keys: list[Key], filt: RowFilter = NO_FILTER) -> np.ndarray:
        """The live ids of ``keys`` that pass ``filt``."""
        parts = []
        for a, b, dead in self._runs(keys):
            ok = np.ones(b - a, bool) if not dead else ~self.base_dead[a:b]
            if filt.active:
                ok &= filt.mask(self.base_ids[a:b], self.base_rec[a:b], self.base_hap[a:b])
            parts.append(self.base_ids[a:b][ok])
        rows = self._delta_rows(keys, filt)
        if len(rows):
            parts.append(self._delta[1][rows])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def _search_ann(self, q, keys, k, nprobe, ef_search, whole_namespace, filt, allowed):
        """ANN search of ``keys``; a selector lets only the allowed ids through, and the
        search widens (nprobe / efSearch) by the inverse of the allowed fraction, so a
        narrow scope probes as many of its own rows as a whole-namespace search does."""
        ns = keys[0][0]
        ann = self.ann[ns]
        if allowed is None and (not whole_namespace or ann.dead):
            allowed = self.scope_ids(keys, filt)
        widen = 1.0
        if allowed is not None:
            widen = self.scope_rows(self.keys_of(ns)) / max(len(allowed), 1)
        nprobe = int(np.ceil((nprobe or self.cfg.nprobe) * widen))
        ef = int(min(np.ceil((ef_search or self.cfg.ef_search) * widen), 16 * 1024))
        return A.search(ann, q, k, self.cfg.metric, allowed, self.max_id, self.rows,
                        nprobe, ef)

    # ---- persistence (index_io.py) --------------------------------------------------
    def save(self, directory: str, order: dict[Key, int]) -> None:
        """Merge delta into base (sorted by ``order``, then id), drop dead rows, and write
        atomically (see ``index_io.py``)."""
        from .index_io import save_index

        save_index(self, directory, order)

    @classmethod
    def load(cls, directory: str, cfg: IndexConfig, dim: int) -> SpaceIndex | None:
        """A saved index, or None if it is missing, of another config or format, or
        corrupt."""
        from .index_io import load_index

        return load_index(cls, directory, cfg, dim)
