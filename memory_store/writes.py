"""Writes for ``TraceStore`` (mixed into it): add, latent-key updates, deletes.

``add`` validates the whole batch before anything is written (a bad trace raises a typed
error naming its position and nothing changes), assigns ids, computes missing text
embeddings, commits everything in one LMDB transaction (retried on map growth), and only
then appends the new rows to the in-memory indexes. A batch whose ids are not all above the
stored ones, an update or a delete marks the indexes for a rebuild instead ("mut:<space>"
generation in the meta database), so an index never silently misses a change.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import layout as L
from .documents import document
from .errors import InvalidInputError, UnknownSessionError, UnknownTraceError
from .index import SpaceIndex
from .records import (
    Trace,
    _decode,
    as_matrix,
    check_name,
    check_value,
    encode_record,
    validate_batch,
)

SPACES = ("text", "latent")


class WriteMixin:
    # ---- writing --------------------------------------------------------------------
    def add(self, traces: Iterable[Trace]) -> np.ndarray:
        """Add a batch of traces atomically; returns their 64-bit ids (int64 array).

        Missing text embeddings are computed from each trace's document (see
        ``documents.py``). The whole batch is validated first; any bad trace raises a typed
        error and nothing is written."""
        self._check_writable()
        traces = list(traces)
        if not traces:
            return np.zeros(0, np.int64)
        db_meta = self._db("meta")

        def snapshot(txn):
            g = lambda k: txn.get(k, db=db_meta)  # noqa: E731
            return (L.u64(g(b"generation")), L.u64(g(b"next_id"), 1),
                    None if g(b"latent_dim") is None else L.u64(g(b"latent_dim")),
                    None if g(b"text_dim") is None else L.u64(g(b"text_dim")))
        gen, next_id, latent_dim, text_dim = self._read(snapshot)
        if latent_dim is None:
            first = next((t.latent_key for t in traces if getattr(t, "latent_key", None)
                          is not None), None)
            if first is not None:
                latent_dim = int(np.asarray(first).reshape(-1).shape[0])
        if text_dim is None and any(getattr(t, "text_embedding", None) is not None
                                    for t in traces):
            first = next(t.text_embedding for t in traces if t.text_embedding is not None)
            text_dim = int(np.asarray(first).reshape(-1).shape[0])
        if text_dim is None and self._embedder is not None:
            text_dim = self._embedder.dim
        mats: dict[str, tuple[list[int], np.ndarray]] = {}
        vt = validate_batch(traces, max_text_chars=self.text_config.max_text_chars,
                            latent_dim=latent_dim, text_dim=text_dim, now=time.time(),
                            stacked=mats)
        appended_only = self._assign_ids(vt, next_id)
        ctx = self._contexts(vt)
        need = [j for j, t in enumerate(vt) if t.text_embedding is None]
        if need:
            docs = [document(vt[j].text, vt[j].meta, self.text_config) for j in need]
            emb = as_matrix(self.embedder.encode(docs), text_dim, "embedder output")
            text_dim = emb.shape[1]
            for j, e in zip(need, emb, strict=True):
                vt[j].text_embedding = e
            mats.pop("text_embedding", None)
        dims = {"text": text_dim, "latent": latent_dim}
        for space, attr in (("text", "text_embedding"), ("latent", "latent_key")):
            # the writer keeps each touched index in sync (loaded, caught up, or new)
            if self._ix[space] is not None or any(getattr(t, attr) is not None for t in vt):
                if self._index(space) is None:
                    self._ix[space] = SpaceIndex(dims[space], self.index_config, gen)
        new_gen = gen + 1
        self._commit_add(vt, ctx, new_gen, latent_dim, text_dim, appended_only)
        ids = np.fromiter((t.id for t in vt), np.int64, len(vt))
        for space, attr in (("text", "text_embedding"), ("latent", "latent_key")):
            ix = self._ix[space]
            if ix is not None and ix.generation == gen and appended_only:
                if attr in mats:
                    pos, vecs = mats[attr]
                    rows = [vt[j] for j in pos]
                else:
                    rows = [t for t in vt if getattr(t, attr) is not None]
                    vecs = (np.stack([getattr(t, attr) for t in rows]) if rows
                            else np.zeros((0, ix.dim), np.float32))
                ix.add(vecs, np.fromiter((t.id for t in rows), np.int64, len(rows)),
                       [(t.namespace, t.session) for t in rows], new_gen)
            elif ix is not None:
                self._ix[space] = None
        return ids

    def _assign_ids(self, vt: list[Trace], next_id: int) -> bool:
        explicit = [t.id for t in vt if t.id is not None]
        if len(set(explicit)) != len(explicit):
            raise InvalidInputError("duplicate trace ids in the batch")
        if explicit:
            db = self._db("traces")
            taken = self._read(lambda txn: [i for i in explicit
                                            if txn.get(L.id_key(i), db=db) is not None])
            if taken:
                raise InvalidInputError(f"trace ids already in the store: {taken[:5]}")
        appended_only = all(i >= next_id for i in explicit)
        nid = max([next_id] + [i + 1 for i in explicit])
        for t in vt:  # vt holds the store's own copies: set ids in place
            if t.id is None:
                t.id = nid
                nid += 1
        return appended_only

    def _contexts(self, vt: list[Trace]) -> list[list[int]]:
        """Ids of the up-to-``context_turns`` earlier traces of the same session."""
        n = self.text_config.context_turns
        out: list[list[int]] = [[] for _ in vt]
        if n == 0:
            return out
        by_sess: dict[tuple[str, str], list[int]] = {}
        for j, t in enumerate(vt):
            by_sess.setdefault((t.namespace, t.session), []).append(j)
        db = self._db("members")

        def last_ids(txn, key):
            cur = txn.cursor(db=db)
            ids: list[int] = []
            if cur.set_key(L.sess_key(*key)) and cur.last_dup():
                ids.append(L.key_id(cur.value()))
                while len(ids) < n and cur.prev_dup():
                    ids.append(L.key_id(cur.value()))
            return ids[::-1]

        for key, rows in by_sess.items():
            prev = self._read(lambda txn, key=key: last_ids(txn, key))
            rows = sorted(rows, key=lambda j: (vt[j].step, j))
            seq = prev + [vt[j].id for j in rows]
            for pos, j in enumerate(rows, start=len(prev)):
                out[j] = seq[max(0, pos - n):pos]
        return out

    def _commit_add(self, vt, ctx, new_gen, latent_dim, text_dim, appended_only) -> None:
        dbs = self._env.dbs
        now = time.time()

        def fn(txn):
            per_sess: dict[tuple[str, str], int] = {}
            skeys: dict[tuple[str, str], bytes] = {}
            # ids of an append-only batch are increasing and above every stored id, so the
            # id-keyed databases take LMDB's fast append path
            app = appended_only and all(a.id < b.id for a, b in zip(vt, vt[1:], strict=False))
            put = txn.put
            tr_db, te_db, lk_db, mem_db = (dbs["traces"], dbs["text_vec"], dbs["latent_vec"],
                                           dbs["members"])
            for t, cx in zip(vt, ctx, strict=True):
                k = L.id_key(t.id)
                put(k, encode_record(t, cx), db=tr_db, append=app)
                if t.text_embedding is not None:
                    put(k, t.text_embedding.tobytes(), db=te_db, append=app)
                if t.latent_key is not None:
                    put(k, t.latent_key.tobytes(), db=lk_db, append=app)
                key = (t.namespace, t.session)
                sk = skeys.get(key)
                if sk is None:
                    sk = skeys[key] = L.sess_key(*key)
                put(sk, k, db=mem_db)
                per_sess[key] = per_sess.get(key, 0) + 1
            for (ns, s), cnt in per_sess.items():
                nraw = txn.get(ns.encode(), db=dbs["namespaces"])
                nsd = json.loads(nraw) if nraw else {"next_ordinal": 0, "created": now}
                sk = L.sess_key(ns, s)
                sraw = txn.get(sk, db=dbs["sessions"])
                if sraw is None:
                    sd = {"ordinal": nsd["next_ordinal"], "count": 0, "first_write": now}
                    nsd["next_ordinal"] += 1
                else:
                    sd = json.loads(sraw)
                sd["count"] += cnt
                nsd["gen"] = new_gen
                txn.put(sk, json.dumps(sd).encode(), db=dbs["sessions"])
                txn.put(ns.encode(), json.dumps(nsd).encode(), db=dbs["namespaces"])
            m = dbs["meta"]
            nid = max(L.u64(txn.get(b"next_id", db=m), 1), max(t.id for t in vt) + 1)
            txn.put(b"next_id", L.id_key(nid), db=m)
            txn.put(b"generation", L.id_key(new_gen), db=m)
            if latent_dim is not None:
                txn.put(b"latent_dim", L.id_key(latent_dim), db=m)
            if text_dim is not None:
                txn.put(b"text_dim", L.id_key(text_dim), db=m)
            if not appended_only:
                for space in SPACES:
                    txn.put(b"mut:" + space.encode(), L.id_key(new_gen), db=m)

        self._env.write(fn)

    def update_latent_keys(self, ids: Iterable[int], keys: Any) -> None:
        """Replace the latent keys of existing traces (e.g. after the model changed)."""
        self._check_writable()
        ids = [int(i) for i in ids]
        keys = as_matrix(keys, self.latent_dim, "latent keys")
        if len(ids) != keys.shape[0]:
            raise InvalidInputError(f"{len(ids)} ids but {keys.shape[0]} keys")
        self.get(ids)  # raises UnknownTraceError
        dbs = self._env.dbs
        dim = keys.shape[1]

        def fn(txn):
            gen = L.u64(txn.get(b"generation", db=dbs["meta"])) + 1
            for i, k in zip(ids, keys, strict=False):
                txn.put(L.id_key(i), k.tobytes(), db=dbs["latent_vec"])
            txn.put(b"latent_dim", L.id_key(dim), db=dbs["meta"])
            txn.put(b"generation", L.id_key(gen), db=dbs["meta"])
            txn.put(b"mut:latent", L.id_key(gen), db=dbs["meta"])
        self._env.write(fn)
        self._ix["latent"] = None

    def update_latents(self, ids: Iterable[int], keys: Any, values: list[Any] | None = None,
                       meta: dict[str, Any] | None = None) -> None:
        """Replace the latent keys, and optionally the latent values, of existing traces and
        merge ``meta`` into their metadata, in one transaction (what a model "reindex" needs:
        keys and values recomputed from the stored text). Validates everything first: an
        unknown id or a bad vector changes nothing."""
        self._check_writable()
        ids = [int(i) for i in ids]
        keys = as_matrix(keys, self.latent_dim, "latent keys")
        if len(ids) != keys.shape[0]:
            raise InvalidInputError(f"{len(ids)} ids but {keys.shape[0]} keys")
        if values is not None and len(values) != len(ids):
            raise InvalidInputError(f"{len(ids)} ids but {len(values)} values")
        vals = None if values is None else [check_value(v) for v in values]
        extra = json.loads(json.dumps(meta or {}))  # must be JSON
        self.get(ids)  # raises UnknownTraceError before anything is written
        dbs = self._env.dbs

        def fn(txn):
            gen = L.u64(txn.get(b"generation", db=dbs["meta"])) + 1
            for j, i in enumerate(ids):
                k = L.id_key(i)
                buf = txn.get(k, db=dbs["traces"])
                if buf is None:
                    raise UnknownTraceError(f"unknown trace id {i}")
                h, lv = _decode(buf, True)
                t = Trace(namespace=h["ns"], session=h["s"], text=h["t"], step=h["st"],
                          meta={**h["m"], **extra}, id=i, created=h["c"],
                          latent_value=lv if vals is None else vals[j])
                txn.put(k, encode_record(t, h["cx"]), db=dbs["traces"])
                txn.put(k, keys[j].tobytes(), db=dbs["latent_vec"])
            txn.put(b"latent_dim", L.id_key(keys.shape[1]), db=dbs["meta"])
            txn.put(b"generation", L.id_key(gen), db=dbs["meta"])
            txn.put(b"mut:latent", L.id_key(gen), db=dbs["meta"])
        self._env.write(fn)
        self._ix["latent"] = None

    # ---- deleting -------------------------------------------------------------------
    def delete_session(self, namespace: str, session: str) -> int:
        """Delete a session and its traces; returns how many traces were deleted."""
        self._check_writable()
        check_name("session", session)
        if session not in self._session_map(namespace):
            raise UnknownSessionError(f"unknown session {session!r} in {namespace!r}")
        return self._delete([(namespace, session)])

    def delete_namespace(self, namespace: str) -> int:
        self._check_writable()
        keys = [(namespace, s.session) for s in self.sessions(namespace)]
        return self._delete(keys, drop_namespace=namespace)

    def _delete(self, keys: list[tuple[str, str]], drop_namespace: str | None = None) -> int:
        dbs = self._env.dbs

        def fn(txn):
            gen = L.u64(txn.get(b"generation", db=dbs["meta"])) + 1
            n = 0
            for ns, s in keys:
                sk = L.sess_key(ns, s)
                cur = txn.cursor(db=dbs["members"])
                ids = list(cur.iternext_dup(keys=False)) if cur.set_key(sk) else []
                for k in ids:
                    for db in ("traces", "text_vec", "latent_vec"):
                        txn.delete(k, db=dbs[db])
                n += len(ids)
                txn.delete(sk, db=dbs["members"])
                txn.delete(sk, db=dbs["sessions"])
                nsd = json.loads(txn.get(ns.encode(), db=dbs["namespaces"]))
                nsd["gen"] = gen
                txn.put(ns.encode(), json.dumps(nsd).encode(), db=dbs["namespaces"])
            if drop_namespace is not None:
                txn.delete(drop_namespace.encode(), db=dbs["namespaces"])
            txn.put(b"generation", L.id_key(gen), db=dbs["meta"])
            for space in SPACES:
                txn.put(b"mut:" + space.encode(), L.id_key(gen), db=dbs["meta"])
            return n

        n = self._env.write(fn)
        self._ix = {"text": None, "latent": None}
        for ns in {k[0] for k in keys}:
            self._lex.pop(ns, None)
            self._sess_cache.pop(ns, None)
        return n
