"""Deletes for ``TraceStore`` (mixed into it): by id, external id, session or namespace.

A delete removes its traces from every LMDB database in one transaction (records, vectors,
``info``, membership, external ids, supersede links; a trace that superseded a deleted one
loses the link), updates session and namespace counts (empty ones disappear), and appends the
removed ids to the change log. The in-memory indexes mark the rows dead (IVF drops the ids in
place, HNSW keeps a dead set), so the next search cannot return them and no delete costs an
index rebuild; other processes' indexes replay the log. ``compact`` (``maintenance.py``) later
gives the space back.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from . import changes as C
from . import layout as L
from .codec import _decode, decode_header, encode_record, trace_of
from .errors import InvalidInputError, UnknownSessionError, UnknownTraceError
from .records import check_name

SPACES = ("text", "latent")


class ForgetMixin:
    def delete(self, ids: Iterable[int | str], namespace: str | None = None) -> int:
        """Delete traces by internal id (ints) or by external id (strings, which need
        ``namespace``); all or nothing: an unknown id raises :class:`UnknownTraceError` and
        deletes nothing. Returns how many traces were deleted."""
        self._check_writable()
        ids = list(ids)
        exts = [i for i in ids if isinstance(i, str)]
        nums = [i for i in ids if not isinstance(i, str)]
        if exts and namespace is None:
            raise InvalidInputError("namespace: external ids need the namespace they live in",
                                    "namespace")
        with self._mu:
            resolved = self.resolve(namespace, exts).tolist() if exts else []
            want = sorted({int(i) for i in nums} | set(resolved))
            db = self._db("traces")
            missing = self._read(lambda txn: [i for i in want if not 0 < i < 2**63
                                              or txn.get(L.id_key(i), db=db) is None])
            if missing:
                raise UnknownTraceError(f"unknown trace id{'s' * (len(missing) > 1)} "
                                        f"{', '.join(map(str, missing[:5]))}")
            if namespace is not None:
                check_name("namespace", namespace)
                wrong = self._read(lambda txn: [i for i in want if L.decode_info(txn.get(
                    L.id_key(i), db=self._db("info")))[2][0] != namespace])
                if wrong:
                    raise InvalidInputError(f"namespace: traces {wrong[:5]} are not in "
                                            f"{namespace!r}", "namespace")
            return self._delete_ids(want)

    def _unlink_superseders(self, txn, ns: str, target: int, doomed: set[int]) -> None:
        """A deleted trace is superseded by nothing: its superseders' links are dropped."""
        dbs = self._env.dbs
        key = L.sess_key(ns, "") + L.id_key(target)
        cur = txn.cursor(db=dbs["superseded"])
        by = [L.key_id(v) for v in cur.iternext_dup(keys=False)] if cur.set_key(key) else []
        txn.delete(key, db=dbs["superseded"])
        for i in by:
            if i in doomed:
                continue
            k = L.id_key(i)
            h, lv = _decode(txn.get(k, db=dbs["traces"]), True)
            t = trace_of(i, h, lv)
            t.supersedes = None
            txn.put(k, encode_record(t, h["cx"]), db=dbs["traces"])

    def delete_session(self, namespace: str, session: str) -> int:
        """Delete a session and its traces; returns how many traces were deleted."""
        self._check_writable()
        check_name("session", session)
        with self._mu:
            if session not in self._session_map(namespace):
                raise UnknownSessionError(f"unknown session {session!r} in {namespace!r}")
            return self._delete_ids(self._members(namespace, session))

    def delete_namespace(self, namespace: str) -> int:
        """Delete a namespace and all its traces; returns how many traces were deleted."""
        self._check_writable()
        with self._mu:
            ids = [i for s in self.sessions(namespace) for i in self._members(namespace,
                                                                               s.session)]
            return self._delete_ids(ids)

    def _delete_ids(self, ids: list[int]) -> int:
        if not ids:
            return 0
        dbs = self._env.dbs
        for space in SPACES:
            if self._ix[space] is not None:
                self._index(space)  # catch up first, so the removal below applies in place
        gen = self.generation

        doomed = set(ids)

        def fn(txn):
            per_sess: dict[tuple[str, str], int] = {}
            touched = set()
            for i in ids:
                k = L.id_key(i)
                h = decode_header(txn.get(k, db=dbs["traces"]))
                ns, s = h["ns"], h["s"]
                for db in ("traces", "text_vec", "latent_vec", "info"):
                    txn.delete(k, db=dbs[db])
                txn.delete(L.sess_key(ns, s), k, db=dbs["members"])
                if h["x"] is not None:
                    txn.delete(L.ext_key(ns, h["x"]), db=dbs["ext"])
                if h["sup"] is not None:
                    txn.delete(L.sess_key(ns, "") + L.id_key(h["sup"]), k, db=dbs["superseded"])
                self._unlink_superseders(txn, ns, i, doomed)
                per_sess[(ns, s)] = per_sess.get((ns, s), 0) - 1
                touched.add(ns)
            self._update_sessions(txn, per_sess, gen + 1, time.time(), touched)
            txn.put(b"generation", L.id_key(gen + 1), db=dbs["meta"])
            C.log_change(txn, dbs, gen + 1, ids, (), C.TEXT | C.LATENT)
            return touched

        touched = self._env.write(fn)
        arr = np.asarray(ids, np.int64)
        for space in SPACES:
            ix = self._ix[space]
            if ix is not None and ix.generation == gen:
                ix.remove(arr, gen + 1, namespaces=touched)
            else:
                self._ix[space] = None
        for ns in touched:
            self._lex.pop(ns, None)
            self._sess_cache.pop(ns, None)
        return len(ids)
