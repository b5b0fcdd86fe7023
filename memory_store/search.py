"""Scoped search for ``TraceStore`` (mixed into it): index sync, vector, lexical and hybrid.

* ``search`` / ``search_batch``: text space (``dense`` MiniLM, ``lexical`` BM25, ``hybrid``
  fusion of both, the default; see ``documents.py``) or latent space, returning :class:`Hit`s.
* ``search_vectors`` / ``search_latent``: the model's path. A (n, dim) batch of query vectors
  with one scope or one scope per query; returns ``(scores, ids)`` arrays of shape (n, k),
  padded with ``-inf`` / ``-1`` where a scope holds fewer than k traces.

Every search runs on one LMDB snapshot. Scopes may carry a time window and hide superseded
traces (``Scope``); both are applied inside the search. ``newest_first=True`` orders equal
scores by the scope's ``time_field``, newest first (a trace without ``happened_at`` counts as
oldest), then by id; it is exact at the k-th place (the search widens until the ties end).

Before searching, a space's in-memory index is synced with LMDB: loaded from disk if needed,
caught up by replaying the change log since the generation it reflects, and rebuilt from LMDB
only when it is missing, corrupt, or older than the log reaches.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import changes as C
from . import layout as L
from .codec import decode_header
from .documents import MODES, context_text, lexical_document, speaker_of
from .errors import InvalidInputError, UnknownSessionError
from .index import NO_FILTER, RowFilter, SpaceIndex
from .lexical import BM25Index
from .records import as_matrix
from .scope import Hit, Scope

Key = tuple[str, str]


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInputError(f"k: must be a positive int, got {k!r}", "k")


class SearchMixin:
    # ---- index sync -----------------------------------------------------------------
    def _space_state(self, txn, space: str) -> tuple[int, int | None]:
        m = self._db("meta")
        dim = txn.get(space.encode() + b"_dim", db=m)
        return L.u64(txn.get(b"generation", db=m)), None if dim is None else L.u64(dim)

    def _index(self, space: str) -> SpaceIndex | None:
        """The synced index of ``space`` (None while the space has no vectors yet)."""
        if space not in ("text", "latent"):
            raise InvalidInputError(f"space: must be 'text' or 'latent', got {space!r}", "space")
        with self._mu:
            gen, dim = self._read(lambda txn: self._space_state(txn, space))
            if dim is None:
                return None
            ix = self._ix[space]
            if ix is not None and ix.dim != dim:
                ix = None
            if ix is None:
                ix = SpaceIndex.load(self._index_dir(space), self.index_config, dim)
            if ix is not None and ix.generation > gen:
                ix = None
            if ix is not None and ix.generation < gen and not self._catch_up(ix, space):
                ix = None
            if ix is None:
                ix = self._build_index(space, dim)
                if self.writable:
                    ix.save(self._index_dir(space), self._key_order())
            self._ix[space] = ix
            return ix

    def _build_index(self, space: str, dim: int) -> SpaceIndex:
        dbs = self._env.dbs
        vdb = dbs["text_vec" if space == "text" else "latent_vec"]

        def fn(txn):
            gen = L.u64(txn.get(b"generation", db=dbs["meta"]))
            keys: list[tuple[Key, int]] = []
            for k, v in txn.cursor(db=dbs["sessions"]):
                ns, s = L.split_sess_key(k)
                keys.append(((ns, s), json.loads(v)["ordinal"]))
            keys.sort(key=lambda x: (x[0][0], x[1]))
            chunks, ids, times, slices = [], [], [], {}
            members = txn.cursor(db=dbs["members"])
            for key, _ in keys:
                start = len(ids)
                if members.set_key(L.sess_key(*key)):
                    for raw_id in members.iternext_dup(keys=False):
                        vec = txn.get(raw_id, db=vdb)
                        if vec is not None:
                            chunks.append(vec)
                            ids.append(L.key_id(raw_id))
                            times.append(L.INFO.unpack_from(txn.get(raw_id, db=dbs["info"])))
                if len(ids) > start:
                    slices[key] = (start, len(ids))
            vecs = np.frombuffer(b"".join(chunks), np.float32).reshape(len(ids), dim)
            t = np.asarray(times, np.float64).reshape(len(ids), 2)
            return SpaceIndex.from_sorted(dim, self.index_config, gen, vecs.copy(),
                                          np.asarray(ids, np.int64), t[:, 0], t[:, 1], slices)
        return self._read(fn)

    def _catch_up(self, ix: SpaceIndex, space: str) -> bool:
        """Replay the change log into ``ix``; False when the log does not reach back."""
        dbs = self._env.dbs
        vdb = dbs["text_vec" if space == "text" else "latent_vec"]

        def fn(txn):
            gen = L.u64(txn.get(b"generation", db=dbs["meta"]))
            plan = C.replay(txn, dbs, ix.generation, space)
            if plan is None:
                return None
            drop, add = plan
            vecs, ids, keys, rec, hap = [], [], [], [], []
            for i in add.tolist():
                k = L.id_key(i)
                v = txn.get(k, db=vdb)
                if v is None:
                    continue
                r, h, key = L.decode_info(txn.get(k, db=dbs["info"]))
                vecs.append(v)
                ids.append(i)
                keys.append(key)
                rec.append(r)
                hap.append(h)
            arr = np.frombuffer(b"".join(vecs), np.float32).reshape(len(ids), ix.dim)
            return gen, drop, arr, np.asarray(ids, np.int64), keys, rec, hap
        out = self._read(fn)
        if out is None:
            return False
        gen, drop, vecs, ids, keys, rec, hap = out
        ix.remove(drop, rewritten=bool(np.isin(drop, ids).any()))
        ix.add(vecs, ids, keys, np.asarray(rec, np.float64), np.asarray(hap, np.float64), gen)
        return True

    def search_paths(self, space: str = "text") -> Counter:
        """How many searches of ``space`` took each path (exact, exact-filtered, ivf, hnsw)
        since the index was loaded or built."""
        ix = self._ix.get(space)
        return Counter() if ix is None else Counter(ix.path_counts)

    # ---- scopes ---------------------------------------------------------------------
    def _scope_keys(self, scope: Scope) -> tuple[list[Key], bool]:
        """(keys in session order, whether the scope is the whole namespace)."""
        smap = self._session_map(scope.namespace)
        if scope.sessions is not None:
            for s in scope.sessions:
                if s not in smap:
                    raise UnknownSessionError(f"unknown session {s!r} in {scope.namespace!r}")
            chosen = sorted({smap[s].ordinal: s for s in scope.sessions}.items())
            keys = [(scope.namespace, s) for _, s in chosen]
            return keys, len(keys) == len(smap)
        infos = sorted(smap.values(), key=lambda x: x.ordinal)
        if scope.before is not None:
            if scope.before not in smap:
                raise UnknownSessionError(
                    f"unknown session {scope.before!r} in {scope.namespace!r}")
            cut = smap[scope.before].ordinal
            infos = [x for x in infos if x.ordinal < cut]
            return [(scope.namespace, x.session) for x in infos], False
        return [(scope.namespace, x.session) for x in infos], True

    def _hidden(self, ns: str) -> np.ndarray:
        """Sorted ids of the traces of ``ns`` that another trace supersedes."""
        self._session_map(ns)
        gen = self._sess_cache[ns][0]
        hit = self._hidden_cache.get(ns)
        if hit is not None and hit[0] == gen:
            return hit[1]
        db = self._db("superseded")
        prefix = ns.encode() + b"\x00"

        def fn(txn):
            out = []
            cur = txn.cursor(db=db)
            if cur.set_range(prefix):
                for k in cur.iternext_nodup(keys=True, values=False):
                    if not bytes(k).startswith(prefix):
                        break
                    out.append(L.key_id(bytes(k)[len(prefix):]))
            return np.asarray(sorted(out), np.int64)
        ids = self._read(fn)
        self._hidden_cache[ns] = (gen, ids)
        return ids

    def _filter(self, scope: Scope) -> RowFilter:
        if not scope.filtered:
            return NO_FILTER
        hidden = self._hidden(scope.namespace) if scope.hide_superseded else None
        return RowFilter(scope.since, scope.until, scope.time_field, hidden)

    @staticmethod
    def _per_query(scopes: Any, n: int) -> list[Scope]:
        if isinstance(scopes, (Scope, str, dict)):
            return [Scope.of(scopes)] * n
        scopes = [Scope.of(s) for s in scopes]
        if len(scopes) != n:
            raise InvalidInputError(f"scopes: {n} queries but {len(scopes)} scopes", "scopes")
        return scopes

    def _times(self, ids: np.ndarray, field: str) -> np.ndarray:
        """The ``field`` time of each id (-inf for padding or an unknown happened_at)."""
        db = self._db("info")
        col = 1 if field == "happened_at" else 0

        def fn(txn):
            out = np.full(len(ids), -np.inf)
            for j, i in enumerate(ids.tolist()):
                if i >= 0:
                    t = L.INFO.unpack_from(txn.get(L.id_key(i), db=db))[col]
                    out[j] = -np.inf if np.isnan(t) else t
            return out
        return self._read(fn)

    def _newest_first(self, scores: np.ndarray, ids: np.ndarray, field: str,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
        """Reorder rows of candidates: score desc, then time desc, then id; keep k."""
        out_s = np.full((len(ids), k), -np.inf, np.float32)
        out_i = np.full((len(ids), k), -1, np.int64)
        for r in range(len(ids)):
            valid = ids[r] >= 0
            s, i = scores[r][valid], ids[r][valid]
            order = np.lexsort((i, -self._times(i, field), -s))[:k]
            out_s[r, :len(order)], out_i[r, :len(order)] = s[order], i[order]
        return out_s, out_i

    # ---- vector search --------------------------------------------------------------
    def search_vectors(self, queries: Any, scopes: Any, k: int = 10, *, space: str = "latent",
                       exact: bool = False, nprobe: int | None = None,
                       ef_search: int | None = None,
                       newest_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Batched scoped top-k over ``space`` (see module docstring)."""
        _check_k(k)
        with self.snapshot():
            ix = self._index(space)
            q = as_matrix(queries, None if ix is None else ix.dim, "query vectors")
            per = self._per_query(scopes, q.shape[0])
            scores = np.full((q.shape[0], k), -np.inf, np.float32)
            ids = np.full((q.shape[0], k), -1, np.int64)
            groups: dict[Scope, list[int]] = {}
            for j, s in enumerate(per):
                groups.setdefault(s, []).append(j)
            for scope, rows in groups.items():
                keys, whole = self._scope_keys(scope)
                if ix is None or not keys:
                    continue
                r = np.asarray(rows)
                filt = self._filter(scope)
                kk = int(k)
                while True:  # newest_first asks one more, to see whether the k-th is tied
                    s, i = ix.search(q[r], keys, kk + 1 if newest_first else kk, exact=exact,
                                     nprobe=nprobe, ef_search=ef_search, whole_namespace=whole,
                                     filt=filt)
                    if not newest_first or kk >= ix.scope_rows(keys) or not (
                            (i[:, kk] >= 0) & (s[:, kk] == s[:, k - 1])).any():
                        break
                    kk *= 2  # the k-th score is tied beyond the window: widen
                if newest_first:
                    s, i = self._newest_first(s, i, scope.time_field, k)
                scores[r], ids[r] = s[:, :k], i[:, :k]
            return scores, ids

    def search_latent(self, queries: Any, scopes: Any, k: int = 10,
                      **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """``search_vectors`` over latent keys (the Engram read path)."""
        return self.search_vectors(queries, scopes, k, space="latent", **params)

    # ---- lexical --------------------------------------------------------------------
    def _lexical(self, ns: str) -> BM25Index:
        """The namespace's BM25 index: cached, brought up to date in place when only new
        traces were added to the namespace since, else rebuilt from LMDB."""
        smap = self._session_map(ns)
        gen = self._sess_cache[ns][0]
        hit = self._lex.get(ns)
        if hit is not None and (hit.generation == gen or self._lex_append(hit, ns, smap, gen)):
            return hit
        tc = self.text_config
        ix = BM25Index(tc.bm25_k1, tc.bm25_b)
        dbs = self._env.dbs

        def fn(txn):
            heads: dict[int, dict] = {}
            cur = txn.cursor(db=dbs["members"])
            for info in sorted(smap.values(), key=lambda x: x.ordinal):
                if cur.set_key(L.sess_key(ns, info.session)):
                    for raw in cur.iternext_dup(keys=False):
                        heads[L.key_id(raw)] = decode_header(txn.get(raw, db=dbs["traces"]))
            return heads
        heads = self._read(fn)
        for i in heads:
            self._link_next(ix, i, heads[i])
        for i in heads:
            self._lex_add(ix, i, heads, smap)
        ix.generation = gen
        self._lex[ns] = ix
        return ix

    def _link_next(self, ix: BM25Index, i: int, h: dict) -> None:
        """Record ``i`` as a next turn of the traces it follows (within ``next_turns``)."""
        for dist, c in enumerate(reversed(h["cx"]), 1):
            if dist <= self.text_config.next_turns:
                ix.after.setdefault(c, []).append(i)

    def _lex_add(self, ix: BM25Index, i: int, heads: dict[int, dict], smap) -> None:
        """(Re)index trace ``i``: its document and its previous / next turn fields."""
        tc = self.text_config
        h = heads[i]
        prev = [(heads[c]["t"], heads[c]["m"]) for c in h["cx"][len(h["cx"]) - tc.context_turns:]
                if tc.context_turns and c in heads]
        nxt = [(heads[c]["t"], heads[c]["m"]) for c in sorted(ix.after.get(i, [])) if c in heads]
        ix.add(i, smap[h["s"]].ordinal, lexical_document(h["t"], h["m"], tc),
               [(context_text(prev, tc), tc.context_weight),
                (context_text(nxt, tc), tc.next_weight)],
               h["c"] or 0.0, np.nan if h["h"] is None else h["h"], speaker_of(h["m"], tc))

    def _lex_append(self, ix: BM25Index, ns: str, smap, gen: int) -> bool:
        """Apply the traces added to ``ns`` since ``ix`` was built; False (rebuild) when the
        namespace also saw deletes or rewrites, or the change log no longer reaches back."""
        dbs = self._env.dbs
        tc = self.text_config

        def fn(txn):
            plan = C.replay(txn, dbs, ix.generation, "text")
            if plan is None or any(int(i) in ix.row_of for i in plan[0].tolist()):
                return None
            new = {}
            for i in plan[1].tolist():
                info = txn.get(L.id_key(i), db=dbs["info"])
                if info is not None and L.decode_info(info)[2][0] == ns:
                    new[i] = decode_header(txn.get(L.id_key(i), db=dbs["traces"]))
            return new
        new = self._read(fn)
        if new is None:
            return False
        for i, h in new.items():
            self._link_next(ix, i, h)
        redo = set(new) | {c for h in new.values() for c in h["cx"][len(h["cx"]) -
                                                                  tc.next_turns:]
                           if tc.next_turns and c in ix.row_of}
        want = set(redo) | {c for i in redo for c in ix.after.get(i, [])}

        def heads_of(txn):
            out = dict(new)

            def fetch(ids):
                for i in ids:
                    raw = txn.get(L.id_key(i), db=dbs["traces"])
                    if raw is not None:
                        out[i] = decode_header(raw)
            fetch(want - out.keys())
            fetch({c for i in redo for c in out[i]["cx"]} - out.keys())  # previous turns
            return out
        heads = self._read(heads_of)
        for i in sorted(redo):
            self._lex_add(ix, i, heads, smap)
        ix.generation = gen
        return True

    # ---- text / hit-level search ----------------------------------------------------
    def search(self, query: Any, scope: Any, k: int = 10, space: str = "text",
               mode: str | None = None, **params: Any) -> list[Hit]:
        """Top-k hits for one query (a string, or a vector for dense/latent search)."""
        return self.search_batch([query], scope, k, space, mode, **params)[0]

    def search_batch(self, queries: Sequence[Any], scopes: Any, k: int = 10,
                     space: str = "text", mode: str | None = None,
                     **params: Any) -> list[list[Hit]]:
        """Hits for many queries at once (text queries are embedded in one batch)."""
        _check_k(k)
        queries = list(queries)
        n = len(queries)
        per = self._per_query(scopes, n)
        if space == "latent":
            s, i = self.search_vectors(queries, per, k, space="latent", **params)
            return self._hits(s, i)
        if space != "text":
            raise InvalidInputError(f"space: must be 'text' or 'latent', got {space!r}", "space")
        mode = mode or self.text_config.default_mode
        if mode not in MODES:
            raise InvalidInputError(f"mode: must be one of {MODES}, got {mode!r}", "mode")
        is_text = [isinstance(q, str) for q in queries]
        if mode != "dense" and not all(is_text):
            raise InvalidInputError(f"mode: {mode!r} needs text queries", "mode")
        for q in queries:
            if isinstance(q, str) and not q.strip():
                raise InvalidInputError("query: empty query text", "query")
        newest = bool(params.get("newest_first"))
        with self.snapshot():
            for s in set(per):
                self._scope_keys(s)  # unknown namespace / session errors before any work
            tc = self.text_config
            depth = max(k, tc.fusion_depth) if mode == "hybrid" else k
            dense: list[tuple[np.ndarray, np.ndarray]] = []
            if mode in ("dense", "hybrid"):
                qv = self._query_vectors(queries, is_text)
                s, i = self.search_vectors(qv, per, depth, space="text", **params)
                dense = [(s[j][i[j] >= 0], i[j][i[j] >= 0]) for j in range(n)]
            lex: list[tuple[np.ndarray, np.ndarray]] = []
            bms: list[BM25Index | None] = []
            if mode in ("lexical", "hybrid"):
                for q, scope in zip(queries, per, strict=True):
                    keys, _ = self._scope_keys(scope)
                    bm = self._lexical(scope.namespace)
                    codes = np.asarray([self._sess_cache[scope.namespace][1][s].ordinal
                                        for _, s in keys], np.int32)
                    lex.append(bm.search(q, codes, depth, self._filter(scope),
                                         keep_ties=newest))
                    bms.append(bm)
            if mode == "dense":
                ranked = dense
            elif mode == "lexical":
                ranked = lex
            else:
                ranked = [self._fuse(d, x, bm.speaker_ids(q) if tc.speaker_boost else set())
                          for d, x, bm, q in zip(dense, lex, bms, queries, strict=True)]
            out_s = np.full((n, k), -np.inf, np.float32)
            out_i = np.full((n, k), -1, np.int64)
            for j, (s, i) in enumerate(ranked):
                if newest and len(i):
                    order = np.lexsort((i, -self._times(i, per[j].time_field), -s))
                    s, i = s[order], i[order]
                out_s[j, : min(k, len(s))], out_i[j, : min(k, len(i))] = s[:k], i[:k]
            return self._hits(out_s, out_i)

    def _query_vectors(self, queries: list[Any], is_text: list[bool]) -> np.ndarray:
        ix = self._index("text")
        dim = ix.dim if ix is not None else self.embedder.dim
        out = np.zeros((len(queries), dim), np.float32)
        texts = [q for q, t in zip(queries, is_text, strict=True) if t]
        if texts:
            out[np.flatnonzero(is_text)] = as_matrix(self.embedder.encode(texts), dim,
                                                     "embedder output")
        for j, (q, t) in enumerate(zip(queries, is_text, strict=True)):
            if not t:
                out[j] = as_matrix(q, dim, "query vector")[0]
        return out

    def _fuse(self, dense, lex, boosted: set[int]) -> tuple[np.ndarray, np.ndarray]:
        """Normalised-score fusion (``documents.py``); returns all candidates, best first."""
        tc = self.text_config
        acc: dict[int, float] = {}
        ls, li = lex
        if len(ls) and ls[0] > 0:
            for i, v in zip(li.tolist(), (ls / ls.max()).tolist(), strict=True):
                acc[i] = acc.get(i, 0.0) + tc.lexical_weight * v
        ds, di = dense
        if len(ds):
            lo, hi = float(ds.min()), float(ds.max())
            norm = (ds - lo) / (hi - lo) if hi > lo else np.ones(len(ds))
            for i, v in zip(di.tolist(), norm.tolist(), strict=True):
                acc[i] = acc.get(i, 0.0) + tc.dense_weight * v
        for i in boosted & acc.keys():
            acc[i] += tc.speaker_boost
        best = sorted(acc.items(), key=lambda x: (-x[1], x[0]))
        return (np.asarray([b[1] for b in best], np.float32),
                np.asarray([b[0] for b in best], np.int64))

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        db = self._db("traces")

        def fn(txn):
            out = []
            for srow, irow in zip(scores, ids, strict=True):
                hits = []
                for s, i in zip(srow.tolist(), irow.tolist(), strict=True):
                    if i < 0:
                        continue
                    h = decode_header(txn.get(L.id_key(i), db=db))
                    hits.append(Hit(i, float(s), h["ns"], h["s"], h["st"], h["t"], h["m"],
                                    h["x"], h["h"], h["c"], h["v"]))
                out.append(hits)
            return out
        return self._read(fn)
