"""Scoped search for ``TraceStore`` (mixed into it): index sync, vector, lexical and hybrid.

* ``search`` / ``search_batch``: text space (``dense`` MiniLM, ``lexical`` BM25, ``hybrid``
  reciprocal-rank fusion of both, the default) or latent space, returning :class:`Hit`s.
* ``search_vectors`` / ``search_latent``: the model's path. A (n, dim) batch of query vectors
  with one scope or one scope per query; returns ``(scores, ids)`` arrays of shape (n, k),
  padded with ``-inf`` / ``-1`` where a scope holds fewer than k traces.

Before searching, a space's in-memory index is synced with LMDB: loaded from disk if needed,
caught up with appended traces when only appends happened since it was built, rebuilt from
LMDB when it is missing, corrupt, or older than the last delete/update.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import layout as L
from .documents import MODES, context_text, document
from .errors import InvalidInputError, UnknownSessionError
from .index import SpaceIndex
from .lexical import BM25Index
from .records import as_matrix, decode_header
from .scope import Hit, Scope

Key = tuple[str, str]


class SearchMixin:
    # ---- index sync -----------------------------------------------------------------
    def _space_state(self, txn, space: str) -> tuple[int, int, int | None]:
        m = self._db("meta")
        dim = txn.get(space.encode() + b"_dim", db=m)
        return (L.u64(txn.get(b"generation", db=m)), L.u64(txn.get(b"mut:" + space.encode(),
                                                                     db=m)),
                None if dim is None else L.u64(dim))

    def _index(self, space: str) -> SpaceIndex | None:
        """The synced index of ``space`` (None while the space has no vectors yet)."""
        if space not in ("text", "latent"):
            raise InvalidInputError(f"space must be 'text' or 'latent', got {space!r}")
        gen, mut, dim = self._read(lambda txn: self._space_state(txn, space))
        if dim is None:
            return None
        ix = self._ix[space]
        if ix is not None and ix.dim != dim:
            ix = None
        if ix is None:
            ix = SpaceIndex.load(self._index_dir(space), self.index_config, dim)
        if ix is not None and (ix.generation > gen or ix.generation < mut):
            ix = None
        if ix is None:
            ix = self._build_index(space, dim)
            if self.writable:
                ix.save(self._index_dir(space), self._key_order())
        elif ix.generation < gen:
            self._catch_up(ix, space)
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
            chunks, ids, slices = [], [], {}
            members = txn.cursor(db=dbs["members"])
            for key, _ in keys:
                start = len(ids)
                if members.set_key(L.sess_key(*key)):
                    for raw_id in members.iternext_dup(keys=False):
                        vec = txn.get(raw_id, db=vdb)
                        if vec is not None:
                            chunks.append(vec)
                            ids.append(L.key_id(raw_id))
                if len(ids) > start:
                    slices[key] = (start, len(ids))
            vecs = np.frombuffer(b"".join(chunks), np.float32).reshape(len(ids), dim)
            return SpaceIndex.from_sorted(dim, self.index_config, gen, vecs.copy(),
                                          np.asarray(ids, np.int64), slices)
        return self._read(fn)

    def _catch_up(self, ix: SpaceIndex, space: str) -> None:
        dbs = self._env.dbs
        vdb = dbs["text_vec" if space == "text" else "latent_vec"]

        def fn(txn):
            gen = L.u64(txn.get(b"generation", db=dbs["meta"]))
            cur = txn.cursor(db=vdb)
            vecs, ids, keys = [], [], []
            if cur.set_range(L.id_key(ix.max_id + 1)):
                for k, v in cur:
                    h = decode_header(txn.get(k, db=dbs["traces"]))
                    vecs.append(v)
                    ids.append(L.key_id(k))
                    keys.append((h["ns"], h["s"]))
            arr = np.frombuffer(b"".join(vecs), np.float32).reshape(len(ids), ix.dim)
            return gen, arr, np.asarray(ids, np.int64), keys
        gen, vecs, ids, keys = self._read(fn)
        ix.add(vecs, ids, keys, gen)

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

    @staticmethod
    def _per_query(scopes: Any, n: int) -> list[Scope]:
        if isinstance(scopes, (Scope, str, dict)):
            return [Scope.of(scopes)] * n
        scopes = [Scope.of(s) for s in scopes]
        if len(scopes) != n:
            raise InvalidInputError(f"{n} queries but {len(scopes)} scopes")
        return scopes

    # ---- vector search --------------------------------------------------------------
    def search_vectors(self, queries: Any, scopes: Any, k: int = 10, *, space: str = "latent",
                       exact: bool = False, nprobe: int | None = None,
                       ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batched scoped top-k over ``space`` (see module docstring)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be a positive int, got {k!r}")
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
            s, i = ix.search(q[r], keys, int(k), exact=exact, nprobe=nprobe,
                             ef_search=ef_search, whole_namespace=whole)
            scores[r], ids[r] = s, i
        return scores, ids

    def search_latent(self, queries: Any, scopes: Any, k: int = 10,
                      **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """``search_vectors`` over latent keys (the Engram read path)."""
        return self.search_vectors(queries, scopes, k, space="latent", **params)

    # ---- lexical --------------------------------------------------------------------
    def _lexical(self, ns: str) -> BM25Index:
        smap = self._session_map(ns)
        gen = self._sess_cache[ns][0]
        hit = self._lex.get(ns)
        if hit is not None and hit.generation == gen:
            return hit
        tc = self.text_config
        ix = BM25Index(tc.bm25_k1, tc.bm25_b)
        dbs = self._env.dbs

        def fn(txn):
            heads: dict[int, dict] = {}
            order = []
            cur = txn.cursor(db=dbs["members"])
            for info in sorted(smap.values(), key=lambda x: x.ordinal):
                if cur.set_key(L.sess_key(ns, info.session)):
                    for raw in cur.iternext_dup(keys=False):
                        i = L.key_id(raw)
                        heads[i] = decode_header(txn.get(raw, db=dbs["traces"]))
                        order.append((i, info.ordinal))
            return heads, order
        heads, order = self._read(fn)
        for i, code in order:
            h = heads[i]
            ctx = [(heads[c]["t"], heads[c]["m"]) for c in h.get("cx", []) if c in heads]
            ix.add(i, code, document(h["t"], h["m"], tc), context_text(ctx, tc),
                   tc.context_weight)
        ix.generation = gen
        self._lex[ns] = ix
        return ix

    # ---- text / hit-level search ----------------------------------------------------
    def search(self, query: Any, scope: Any, k: int = 10, space: str = "text",
               mode: str | None = None, **params: Any) -> list[Hit]:
        """Top-k hits for one query (a string, or a vector for dense/latent search)."""
        return self.search_batch([query], scope, k, space, mode, **params)[0]

    def search_batch(self, queries: Sequence[Any], scopes: Any, k: int = 10,
                     space: str = "text", mode: str | None = None,
                     **params: Any) -> list[list[Hit]]:
        """Hits for many queries at once (text queries are embedded in one batch)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k must be a positive int, got {k!r}")
        queries = list(queries)
        n = len(queries)
        per = self._per_query(scopes, n)
        if space == "latent":
            s, i = self.search_vectors(queries, per, k, space="latent", **params)
            return self._hits(s, i)
        if space != "text":
            raise InvalidInputError(f"space must be 'text' or 'latent', got {space!r}")
        mode = mode or self.text_config.default_mode
        if mode not in MODES:
            raise InvalidInputError(f"mode must be one of {MODES}, got {mode!r}")
        is_text = [isinstance(q, str) for q in queries]
        if mode != "dense" and not all(is_text):
            raise InvalidInputError(f"mode {mode!r} needs text queries")
        for q in queries:
            if isinstance(q, str) and not q.strip():
                raise InvalidInputError("empty query text")
        for s in set(per):
            self._scope_keys(s)  # unknown namespace / session errors before any work
        depth = max(k, self.text_config.fusion_depth) if mode == "hybrid" else k
        dense: list[tuple[np.ndarray, np.ndarray]] = []
        if mode in ("dense", "hybrid"):
            qv = self._query_vectors(queries, is_text)
            s, i = self.search_vectors(qv, per, depth, space="text", **params)
            dense = [(s[j][i[j] >= 0], i[j][i[j] >= 0]) for j in range(n)]
        lex: list[tuple[np.ndarray, np.ndarray]] = []
        if mode in ("lexical", "hybrid"):
            for q, scope in zip(queries, per, strict=False):
                keys, _ = self._scope_keys(scope)
                bm = self._lexical(scope.namespace)
                codes = np.asarray([self._sess_cache[scope.namespace][1][s].ordinal
                                    for _, s in keys], np.int32)
                lex.append(bm.search(q, codes, depth))
        if mode == "dense":
            ranked = dense
        elif mode == "lexical":
            ranked = lex
        else:
            ranked = [self._fuse(d, x, k) for d, x in zip(dense, lex, strict=False)]
        out_s = np.full((n, k), -np.inf, np.float32)
        out_i = np.full((n, k), -1, np.int64)
        for j, (s, i) in enumerate(ranked):
            out_s[j, : min(k, len(s))], out_i[j, : min(k, len(i))] = s[:k], i[:k]
        return self._hits(out_s, out_i)

    def _query_vectors(self, queries: list[Any], is_text: list[bool]) -> np.ndarray:
        ix = self._index("text")
        dim = ix.dim if ix is not None else self.embedder.dim
        out = np.zeros((len(queries), dim), np.float32)
        texts = [q for q, t in zip(queries, is_text, strict=False) if t]
        if texts:
            out[np.flatnonzero(is_text)] = as_matrix(self.embedder.encode(texts), dim,
                                                     "embedder output")
        for j, (q, t) in enumerate(zip(queries, is_text, strict=False)):
            if not t:
                out[j] = as_matrix(q, dim, "query vector")[0]
        return out

    def _fuse(self, dense, lex, k):
        """Weighted reciprocal-rank fusion: score = sum_r w_r / (rrf_k + rank_r)."""
        tc = self.text_config
        acc: dict[int, float] = {}
        for (_, ids), w in ((dense, tc.dense_weight), (lex, tc.lexical_weight)):
            for rank, i in enumerate(ids.tolist()):
                acc[i] = acc.get(i, 0.0) + w / (tc.rrf_k + rank + 1)
        best = sorted(acc.items(), key=lambda x: (-x[1], x[0]))[:k]
        return (np.asarray([b[1] for b in best], np.float32),
                np.asarray([b[0] for b in best], np.int64))

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        db = self._db("traces")

        def fn(txn):
            out = []
            for srow, irow in zip(scores, ids, strict=False):
                hits = []
                for s, i in zip(srow.tolist(), irow.tolist(), strict=False):
                    if i < 0:
                        continue
                    h = decode_header(txn.get(L.id_key(i), db=db))
                    hits.append(Hit(i, float(s), h["ns"], h["s"], h["st"], h["t"], h["m"]))
                out.append(hits)
            return out
        return self._read(fn)
