"""Writes for ``TraceStore`` (mixed into it): add (with upserts) and latent re-keys.

``add`` validates the whole batch before anything is written (a bad trace raises a typed
error naming its position and field, and nothing changes), resolves identities (a trace whose
``external_id`` its namespace holds is rewritten under the same internal id, ``version`` + 1;
``supersedes`` given as an external id becomes an internal id), computes missing text
embeddings, commits everything in one LMDB transaction (retried on map growth) with one
change-log entry, and only then updates the in-memory indexes (rewritten rows are replaced in
place). Re-keys work the same way. Deletes are in ``forget.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import changes as C
from . import layout as L
from .codec import _decode, decode_header, encode_record, trace_of
from .documents import dense_document
from .errors import InvalidInputError, UnknownTraceError
from .index import SpaceIndex
from .records import Trace, as_matrix, check_meta, check_value, validate_batch

SPACES = ("text", "latent")
ATTR = {"text": "text_embedding", "latent": "latent_key"}


class WriteMixin:
    # ---- adding ---------------------------------------------------------------------
    def add(self, traces: Iterable[Trace]) -> np.ndarray:
        """Add (or, by external id, rewrite) a batch of traces atomically; returns their
        64-bit internal ids (int64 array, in input order).

        Missing text embeddings are computed from each trace's document (see
        ``documents.py``). The whole batch is validated first; any bad trace raises a typed
        error and nothing is written."""
        self._check_writable()
        traces = list(traces)
        if not traces:
            return np.zeros(0, np.int64)
        with self._mu:
            return self._add(traces)

    def _add(self, traces: list[Trace], contexts: list | None = None) -> np.ndarray:
        """``contexts``: per trace, its lexical context ids to keep (an import), or None."""
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
        old = self._identify(vt, next_id)
        ctx = self._contexts(vt, old)
        for j, c in enumerate(contexts or []):
            if c is not None:
                ctx[j] = [int(x) for x in c]
        need = [j for j, t in enumerate(vt) if t.text_embedding is None]
        if need:
            docs = self._dense_docs(vt, ctx, need)
            emb = as_matrix(self.embedder.encode(docs), text_dim, "embedder output")
            text_dim = emb.shape[1]
            for j, e in zip(need, emb, strict=True):
                vt[j].text_embedding = e
            mats.pop("text_embedding", None)
        dims = {"text": text_dim, "latent": latent_dim}
        for space in SPACES:
            # the writer keeps each touched index in sync (loaded, caught up, or new)
            if self._ix[space] is not None or any(getattr(t, ATTR[space]) is not None
                                                  for t in vt):
                if self._index(space) is None:
                    self._ix[space] = SpaceIndex(dims[space], self.index_config, gen)
        new_gen = gen + 1
        self._commit_add(vt, ctx, old, new_gen, next_id, latent_dim, text_dim)
        ids = np.fromiter((t.id for t in vt), np.int64, len(vt))
        rewritten = np.asarray(sorted(old), np.int64)
        for space in SPACES:
            ix = self._ix[space]
            if ix is None:
                continue
            if ix.generation != gen:
                self._ix[space] = None  # the log brings it up to date on next use
                continue
            attr = ATTR[space]
            if attr in mats:
                pos, vecs = mats[attr]
                rows = [vt[j] for j in pos]
            else:
                rows = [t for t in vt if getattr(t, attr) is not None]
                vecs = (np.stack([getattr(t, attr) for t in rows]) if rows
                        else np.zeros((0, ix.dim), np.float32))
            ix.remove(rewritten, rewritten=True)
            ix.add(vecs, np.fromiter((t.id for t in rows), np.int64, len(rows)),
                   [(t.namespace, t.session) for t in rows],
                   np.fromiter((t.recorded_at for t in rows), np.float64, len(rows)),
                   np.fromiter((np.nan if t.happened_at is None else t.happened_at
                                for t in rows), np.float64, len(rows)), new_gen)
        return ids  # cached lexical indexes catch up with these appends on their next use

    def _identify(self, vt: list[Trace], next_id: int) -> dict[int, dict]:
        """Assign internal ids in place; resolve external ids (upserts) and ``supersedes``.
        Returns the decoded headers of the traces being rewritten, by id."""
        dbs = self._env.dbs
        seen_ext: dict[tuple[str, str], int] = {}
        seen_id: dict[int, int] = {}
        for j, t in enumerate(vt):
            if t.external_id is not None:
                key = (t.namespace, t.external_id)
                if key in seen_ext:
                    raise InvalidInputError(f"trace {j}: external_id {t.external_id!r} repeats "
                                            f"trace {seen_ext[key]} of the batch", "external_id")
                seen_ext[key] = j
            if t.id is not None:
                if t.id in seen_id:
                    raise InvalidInputError(f"trace {j}: id {t.id} repeats trace "
                                            f"{seen_id[t.id]} of the batch", "id")
                seen_id[t.id] = j

        def lookup(txn):
            ext = {k: txn.get(L.ext_key(*k), db=dbs["ext"]) for k in seen_ext}
            taken = {i: txn.get(L.id_key(i), db=dbs["traces"]) for i in seen_id}
            return ({k: L.key_id(v) for k, v in ext.items() if v is not None},
                    {i: decode_header(v) for i, v in taken.items() if v is not None})
        ext_ids, taken = self._read(lookup)
        old_ids = set(ext_ids.values())
        old = self._read(lambda txn: {i: decode_header(txn.get(L.id_key(i), db=dbs["traces"]))
                                      for i in old_ids})
        for j, t in enumerate(vt):
            prev = ext_ids.get((t.namespace, t.external_id)) if t.external_id else None
            if prev is not None:
                if t.id is not None and t.id != prev:
                    raise InvalidInputError(
                        f"trace {j}: id {t.id} but external_id {t.external_id!r} is trace "
                        f"{prev} of {t.namespace!r}", "id")
                t.id = prev
                t.version = old[prev]["v"] + 1
            elif t.id is not None and t.id in taken:
                raise InvalidInputError(f"trace {j}: id {t.id} is already in the store", "id")
        nid = max([next_id] + [t.id + 1 for t in vt if t.id is not None])
        for t in vt:  # vt holds the store's own copies: set ids in place
            if t.id is None:
                t.id = nid
                nid += 1
            if t.version is None:
                t.version = 1
        self._resolve_supersedes(vt, seen_ext)
        return old

    def _resolve_supersedes(self, vt: list[Trace], batch_ext: dict) -> None:
        dbs = self._env.dbs
        for j, t in enumerate(vt):
            sup = t.supersedes
            if sup is None:
                continue
            if isinstance(sup, str):
                if (t.namespace, sup) in batch_ext:
                    target = vt[batch_ext[(t.namespace, sup)]].id
                else:
                    raw = self._read(lambda txn, s=sup, ns=t.namespace: txn.get(
                        L.ext_key(ns, s), db=dbs["ext"]))
                    if raw is None:
                        raise UnknownTraceError(f"trace {j}: supersedes: unknown external id "
                                                f"{sup!r} in {t.namespace!r}")
                    target = L.key_id(raw)
            else:
                target = sup
                in_batch = next((u for u in vt if u.id == sup), None)
                if in_batch is not None:
                    ns = in_batch.namespace
                else:
                    raw = self._read(lambda txn, s=sup: txn.get(L.id_key(s), db=dbs["info"]))
                    if raw is None:
                        raise UnknownTraceError(f"trace {j}: supersedes: unknown trace id {sup}")
                    ns = L.decode_info(raw)[2][0]
                if ns != t.namespace:
                    raise InvalidInputError(f"trace {j}: supersedes: trace {sup} is in "
                                            f"namespace {ns!r}, not {t.namespace!r}",
                                            "supersedes")
            if target == t.id:
                raise InvalidInputError(f"trace {j}: supersedes: a trace cannot supersede "
                                        "itself", "supersedes")
            t.supersedes = target

    def _contexts(self, vt: list[Trace], old: dict[int, dict]) -> list[list[int]]:
        """Ids of the up-to-``context_turns`` earlier traces of the same session (a rewrite
        in its old session keeps its old context)."""
        n = max(self.text_config.context_turns, self.text_config.dense_context_turns)
        out: list[list[int]] = [[] for _ in vt]
        if n == 0:
            return out
        by_sess: dict[tuple[str, str], list[int]] = {}
        for j, t in enumerate(vt):
            h = old.get(t.id)
            if h is not None and h["s"] == t.session:
                out[j] = h["cx"]
            else:
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

    def _dense_docs(self, vt: list[Trace], ctx: list[list[int]], rows: list[int]) -> list[str]:
        n = self.text_config.dense_context_turns
        in_batch = {t.id: (t.text, t.meta) for t in vt}
        want = {c for j in rows for c in ctx[j][len(ctx[j]) - n:] if n and c not in in_batch}
        db = self._db("traces")

        def fn(txn):
            out = {}
            for i in want:
                raw = txn.get(L.id_key(i), db=db)
                if raw is not None:
                    h = decode_header(raw)
                    out[i] = (h["t"], h["m"])
            return out
        known = {**self._read(fn), **in_batch}
        docs = []
        for j in rows:
            before = [known[c] for c in (ctx[j][len(ctx[j]) - n:] if n else []) if c in known]
            docs.append(dense_document(vt[j].text, vt[j].meta, before, self.text_config))
        return docs

    def _commit_add(self, vt, ctx, old, new_gen, next_id, latent_dim, text_dim) -> None:
        dbs = self._env.dbs
        now = time.time()

        def fn(txn):
            # sessions get their ordinals in the order the batch first names them
            per_sess: dict[tuple[str, str], int] = {}
            for t in vt:
                h = old.get(t.id)
                if h is None or h["s"] != t.session:
                    per_sess.setdefault((t.namespace, t.session), 0)
            put, delete = txn.put, txn.delete
            tr_db, te_db, lk_db, in_db, mem_db = (dbs["traces"], dbs["text_vec"],
                                                  dbs["latent_vec"], dbs["info"], dbs["members"])
            fresh = sorted((t for t in vt if t.id not in old), key=lambda t: t.id)
            # ids above every stored one, written in increasing order, take LMDB's fast
            # append path in the id-keyed databases
            app = bool(fresh) and fresh[0].id >= next_id
            for t, cx in sorted(zip(vt, ctx, strict=True), key=lambda p: (p[0].id in old and -1,
                                                                           p[0].id)):
                k = L.id_key(t.id)
                a = app and t.id not in old
                h = old.get(t.id)
                if h is not None:  # a rewrite: retire what the old version had
                    if h["s"] != t.session:
                        delete(L.sess_key(h["ns"], h["s"]), k, db=mem_db)
                        per_sess[(h["ns"], h["s"])] = per_sess.get((h["ns"], h["s"]), 0) - 1
                    if h["sup"] is not None and h["sup"] != t.supersedes:
                        delete(L.sess_key(t.namespace, "") + L.id_key(h["sup"]), k,
                               db=dbs["superseded"])
                    for db, v in ((te_db, t.text_embedding), (lk_db, t.latent_key)):
                        if v is None:
                            delete(k, db=db)
                put(k, encode_record(t, cx), db=tr_db, append=a)
                if t.text_embedding is not None:
                    put(k, t.text_embedding.tobytes(), db=te_db, append=a)
                if t.latent_key is not None:
                    put(k, t.latent_key.tobytes(), db=lk_db, append=a)
                put(k, L.encode_info(t.recorded_at, t.happened_at, t.namespace, t.session),
                    db=in_db, append=a)
                if t.external_id is not None:
                    put(L.ext_key(t.namespace, t.external_id), k, db=dbs["ext"])
                if t.supersedes is not None:
                    put(L.sess_key(t.namespace, "") + L.id_key(t.supersedes), k,
                        db=dbs["superseded"])
                if h is None or h["s"] != t.session:
                    put(L.sess_key(t.namespace, t.session), k, db=mem_db)
                    key = (t.namespace, t.session)
                    per_sess[key] = per_sess.get(key, 0) + 1
            self._update_sessions(txn, per_sess, new_gen, now,
                                  {t.namespace for t in vt})
            m = dbs["meta"]
            nid = max(L.u64(txn.get(b"next_id", db=m), 1), max(t.id for t in vt) + 1)
            txn.put(b"next_id", L.id_key(nid), db=m)
            txn.put(b"generation", L.id_key(new_gen), db=m)
            if latent_dim is not None:
                txn.put(b"latent_dim", L.id_key(latent_dim), db=m)
            if text_dim is not None:
                txn.put(b"text_dim", L.id_key(text_dim), db=m)
            C.log_change(txn, dbs, new_gen, (), [t.id for t in vt], C.TEXT | C.LATENT)

        self._env.write(fn)

    def _update_sessions(self, txn, per_sess: dict[tuple[str, str], int], gen: int,
                         now: float, touched: set[str]) -> None:
        """Apply per-session count changes; drop sessions that became empty and namespaces
        left without sessions; stamp every touched namespace with ``gen``."""
        dbs = self._env.dbs
        nss: dict[str, dict] = {}
        for ns in touched | {ns for ns, _ in per_sess}:
            raw = txn.get(ns.encode(), db=dbs["namespaces"])
            nss[ns] = json.loads(raw) if raw else {"next_ordinal": 0, "created": now}
        for (ns, s), delta in per_sess.items():
            sk = L.sess_key(ns, s)
            raw = txn.get(sk, db=dbs["sessions"])
            if raw is None:
                sd = {"ordinal": nss[ns]["next_ordinal"], "count": 0, "first_write": now}
                nss[ns]["next_ordinal"] += 1
            else:
                sd = json.loads(raw)
            sd["count"] += delta
            if sd["count"] > 0:
                txn.put(sk, json.dumps(sd).encode(), db=dbs["sessions"])
            elif raw is not None:
                txn.delete(sk, db=dbs["sessions"])
        for ns, nsd in nss.items():
            cur = txn.cursor(db=dbs["sessions"])
            prefix = ns.encode() + b"\x00"
            if cur.set_range(prefix) and bytes(cur.key()).startswith(prefix):
                nsd["gen"] = gen
                txn.put(ns.encode(), json.dumps(nsd).encode(), db=dbs["namespaces"])
            else:
                txn.delete(ns.encode(), db=dbs["namespaces"])

    # ---- latent re-keys -------------------------------------------------------------
    def update_latent_keys(self, ids: Iterable[int], keys: Any) -> None:
        """Replace the latent keys of existing traces (e.g. after the model changed)."""
        self.update_latents(ids, keys)

    def update_latents(self, ids: Iterable[int], keys: Any, values: list[Any] | None = None,
                       meta: dict[str, Any] | list[dict[str, Any]] | None = None) -> None:
        """Replace the latent keys, and optionally the latent values, of existing traces and
        merge ``meta`` (one dict for all, or one per id) into their metadata, in one
        transaction (what a model "reindex" needs: keys and values recomputed from the stored
        text). Validates everything first: an unknown id or a bad vector changes nothing."""
        self._check_writable()
        ids = [int(i) for i in ids]
        keys = as_matrix(keys, self.latent_dim, "latent_key")
        if len(ids) != keys.shape[0]:
            raise InvalidInputError(f"latent_key: {len(ids)} ids but {keys.shape[0]} keys",
                                    "latent_key")
        if len(set(ids)) != len(ids):
            raise InvalidInputError("id: repeated ids in one update", "id")
        if values is not None and len(values) != len(ids):
            raise InvalidInputError(f"latent_value: {len(ids)} ids but {len(values)} values",
                                    "latent_value")
        vals = None if values is None else [check_value(v) for v in values]
        metas = meta if isinstance(meta, list) else [meta or {}] * len(ids)
        if len(metas) != len(ids):
            raise InvalidInputError(f"meta: {len(ids)} ids but {len(metas)} meta dicts", "meta")
        try:
            extras = [json.loads(json.dumps(check_meta(m), allow_nan=False)) for m in metas]
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"meta: is not JSON-serialisable: {e}", "meta") from None
        with self._mu:
            self.get(ids)  # raises UnknownTraceError before anything is written
            ix = self._index("latent")
            gen = self.generation
            dbs = self._env.dbs

            def fn(txn):
                where = []
                for j, i in enumerate(ids):
                    k = L.id_key(i)
                    h, lv = _decode(txn.get(k, db=dbs["traces"]), True)
                    if values is not None or extras[j]:
                        t = trace_of(i, h, lv if vals is None else vals[j])
                        t.meta = {**h["m"], **extras[j]}
                        txn.put(k, encode_record(t, h["cx"]), db=dbs["traces"])
                    txn.put(k, keys[j].tobytes(), db=dbs["latent_vec"])
                    where.append(L.decode_info(txn.get(k, db=dbs["info"])))
                txn.put(b"latent_dim", L.id_key(keys.shape[1]), db=dbs["meta"])
                txn.put(b"generation", L.id_key(gen + 1), db=dbs["meta"])
                C.log_change(txn, dbs, gen + 1, (), ids, C.LATENT)
                return where
            where = self._env.write(fn)
            if ix is not None and ix.generation == gen and ix.dim == keys.shape[1]:
                arr = np.asarray(ids, np.int64)
                ix.remove(arr, rewritten=True)
                ix.add(keys, arr, [w[2] for w in where], np.array([w[0] for w in where]),
                       np.array([w[1] for w in where]), gen + 1)
            else:
                self._ix["latent"] = None
