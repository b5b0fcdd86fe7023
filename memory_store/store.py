"""``TraceStore``: the FAISS-indexed LMDB store of traces keyed by namespace and session.

Guarantees (see ``docs/store.md``):

* LMDB is the truth. ``add`` validates the whole batch first (a bad trace raises a typed error
  and writes nothing), commits it in one LMDB transaction, then updates the in-memory indexes.
  Indexes are caches saved atomically on ``flush``/``close``; when missing, stale or corrupt
  they are rebuilt from LMDB.
* One writer per store (``writer.lock``, flock: released by the kernel when a process dies);
  a second writer gets :class:`WriterLockedError` or waits up to ``wait_for_lock`` seconds.
  Any number of readers (``mode="r"``, in any processes) read while it writes: each search or
  ``get`` runs on one LMDB snapshot (the last commit, never a torn state) and indexes catch up
  with the writer's commits through the change log (``changes.py``) before each search.
* Thread-safe: one ``TraceStore`` may be shared by threads (its operations are serialized);
  threads that should read in parallel open a ``TraceStore`` each (they share one LMDB
  environment).
* The LMDB map grows by itself (see ``layout.py``).

External ids (``Trace.external_id``) make writes idempotent: adding a trace whose external id
its namespace holds replaces that trace (same internal id, ``version`` + 1). A session runner
that passes ``Trace(ns, session, text, ..., external_id=f"{session}/{segment_index}",
happened_at=when)`` can re-run a session and get the same store. ``resolve(ns, external_ids)``
maps them to internal ids (for ``get`` / ``delete``).

Writing lives in ``writes.py``, deleting in ``forget.py``, searching in ``search.py``,
maintenance (verify, rebuild, compact) in ``maintenance.py`` and export/import in
``transfer.py``; all are mixed into this class.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import numpy as np

from . import layout as L
from .codec import decode_header, decode_record
from .documents import TextConfig
from .embedder import EmbedderLike, default_embedder
from .errors import (
    InvalidInputError,
    ReadOnlyError,
    UnknownNamespaceError,
    UnknownTraceError,
    WriterLockedError,
)
from .forget import ForgetMixin
from .index import IndexConfig, SpaceIndex
from .maintenance import MaintenanceMixin
from .records import Trace, check_external_id, check_name
from .scope import SessionInfo
from .search import SearchMixin
from .writes import WriteMixin

SPACES = ("text", "latent")


def _config(cls, stored: dict[str, Any]):
    """A config dataclass from its stored JSON; fields this version does not know are
    ignored (the persisted format version guards incompatible changes)."""
    return cls(**{k: v for k, v in stored.items() if k in cls.__dataclass_fields__})
VEC_DB = {"text": "text_vec", "latent": "latent_vec"}


class TraceStore(WriteMixin, ForgetMixin, SearchMixin, MaintenanceMixin):
    """Open with :meth:`open` (a context manager); see the module docstring."""

    def __init__(self, path: str, env: L._Env, writable: bool, lock_fd: int | None,
                 embedder: EmbedderLike | None):
        self.path, self._env, self.writable, self._lock_fd = path, env, writable, lock_fd
        self._embedder = embedder
        self._ix: dict[str, SpaceIndex | None] = {"text": None, "latent": None}
        self._lex: dict[str, Any] = {}
        self._sess_cache: dict[str, tuple[int, dict[str, SessionInfo]]] = {}
        self._hidden_cache: dict[str, tuple[int, Any]] = {}
        self._mu = threading.RLock()
        self._pinned = threading.local()
        self._closed = False
        cfg = self._read(lambda txn: L.meta_json(txn, self._db("meta"), b"config")) or {}
        self.index_config = _config(IndexConfig, cfg.get("index", {}))
        self.text_config = _config(TextConfig, cfg.get("text", {}))

    # ---- opening / closing ----------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, mode: str = "w", create: bool = True,
             latent_dim: int | None = None, index: IndexConfig | None = None,
             text: TextConfig | None = None, embedder: EmbedderLike | None = None,
             wait_for_lock: bool | float = False, map_size: int = 1 << 28) -> TraceStore:
        """Open (and with ``create`` make) the store at ``path``.

        ``mode``: ``"w"`` (the single writer) or ``"r"`` (a reader). ``latent_dim`` fixes the
        latent space's dimension (else the first latent key does). ``index``/``text`` set the
        configuration of a new store; given for an existing store by the writer, a different
        ``index`` config is adopted and the indexes rebuilt. ``embedder`` defaults to MiniLM.
        ``wait_for_lock``: False (raise when another writer holds the lock), True (wait) or
        seconds to wait. A store of an older format is upgraded when opened with mode='w'."""
        if mode not in ("r", "w"):
            raise ValueError(f"mode: must be 'r' or 'w', got {mode!r}")
        path = os.fspath(path)
        writable_dir, version = L.check_dir(path, create=create and mode == "w")
        if mode == "w" and not writable_dir:
            raise ReadOnlyError(f"{path}: the store directory is not writable; open it with "
                                "mode='r'")
        lock_fd = cls._take_lock(path, wait_for_lock) if mode == "w" else None
        try:
            env = L.acquire_env(path, writable_dir, map_size)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        store = cls(path, env, mode == "w", lock_fd, embedder)
        try:
            if mode == "w":
                if version < L.FORMAT_VERSION:
                    store._upgrade()
                store._init_meta(latent_dim, index, text)
            elif latent_dim is not None and store.latent_dim not in (None, latent_dim):
                raise InvalidInputError(f"latent_dim {latent_dim} != the store's "
                                        f"{store.latent_dim}")
        except BaseException:
            store.close()
            raise
        return store

    def _upgrade(self) -> None:
        """Format 1 -> 2: fill the ``info`` database from the records; the change log starts
        at the current generation (older indexes are rebuilt)."""
        dbs = self._env.dbs

        def fn(txn):
            for k, v in txn.cursor(db=dbs["traces"]):
                h = decode_header(v)
                txn.put(k, L.encode_info(h["c"] or 0.0, None, h["ns"], h["s"]), db=dbs["info"])
            txn.put(b"log_floor", txn.get(b"generation", db=dbs["meta"]) or L.id_key(0),
                    db=dbs["meta"])
        self._env.write(fn)
        L.mark_current(self.path)

    @staticmethod
    def _take_lock(path: str, wait: bool | float) -> int:
        fd = os.open(os.path.join(path, "writer.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if wait is True else time.monotonic() + float(wait or 0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    waited = "" if not wait else f" after waiting {float(wait):g} s"
                    raise WriterLockedError(
                        f"{path}: another process holds the writer lock{waited} (open with "
                        "mode='r' to read, or wait for it: wait_for_lock=SECONDS, "
                        "--wait SECONDS)") from None
                time.sleep(0.05)

    def _init_meta(self, latent_dim, index, text) -> None:
        def fn(txn):
            db = self._db("meta")
            cfg = L.meta_json(txn, db, b"config")
            changed = False
            if cfg is None:
                cfg = {"index": asdict(index or IndexConfig()),
                       "text": asdict(text or TextConfig())}
                txn.put(b"generation", L.id_key(0), db=db)
                txn.put(b"next_id", L.id_key(1), db=db)
                changed = True
            elif index is not None and asdict(index) != cfg["index"]:
                cfg["index"] = asdict(index)
                changed = True
            if changed:
                txn.put(b"config", json.dumps(cfg).encode(), db=db)
            old = txn.get(b"latent_dim", db=db)
            if latent_dim is not None:
                if old is not None and L.u64(old) != latent_dim:
                    raise InvalidInputError(f"latent_dim {latent_dim} != the store's "
                                            f"{L.u64(old)}")
                txn.put(b"latent_dim", L.id_key(int(latent_dim)), db=db)
            return cfg

        if latent_dim is not None and (isinstance(latent_dim, bool) or int(latent_dim) < 1):
            raise InvalidInputError(f"latent_dim must be a positive int, got {latent_dim!r}")
        cfg = self._env.write(fn)
        self.index_config = _config(IndexConfig, cfg["index"])
        self.text_config = _config(TextConfig, cfg["text"])

    def close(self) -> None:
        """Save stale indexes (writer), release the lock and the LMDB environment."""
        if self._closed:
            return
        try:
            if self.writable:
                self.flush()
        finally:
            self._closed = True
            L.release_env(self._env)
            if self._lock_fd is not None:
                os.close(self._lock_fd)

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def flush(self) -> None:
        """Write the in-memory indexes to disk (atomically) if they are newer than saved."""
        self._check_writable()
        with self._mu:
            for space in SPACES:
                ix = self._ix[space]
                if ix is not None and ix.generation != ix.saved_generation:
                    ix.save(self._index_dir(space), self._key_order())

    # ---- small helpers --------------------------------------------------------------
    def _db(self, name: str):
        return self._env.dbs[name]

    def _read(self, fn):
        if getattr(self, "_closed", False):
            raise InvalidInputError("the store is closed")
        txn = getattr(self._pinned, "txn", None)
        return fn(txn) if txn is not None else self._env.read(fn)

    @contextlib.contextmanager
    def snapshot(self):
        """Run the reads inside on one LMDB snapshot (the commit current at entry); every
        search and ``get`` uses one, so a concurrent writer never shows a torn state."""
        if getattr(self._pinned, "txn", None) is not None:
            yield
            return
        if self._closed:
            raise InvalidInputError("the store is closed")
        with self._mu:
            txn = self._env.begin()
            self._pinned.txn = txn
            try:
                yield
            finally:
                self._pinned.txn = None
                txn.abort()

    def _check_writable(self) -> None:
        if self._closed:
            raise InvalidInputError("the store is closed")
        if not self.writable:
            raise ReadOnlyError(f"{self.path}: opened read-only (mode='r')")

    def _index_dir(self, space: str) -> str:
        return os.path.join(self.path, "index", space)

    def _meta_u64(self, key: bytes) -> int | None:
        raw = self._read(lambda txn: txn.get(key, db=self._db("meta")))
        return None if raw is None else L.u64(raw)

    @property
    def generation(self) -> int:
        return self._meta_u64(b"generation") or 0

    @property
    def latent_dim(self) -> int | None:
        return self._meta_u64(b"latent_dim")

    @property
    def text_dim(self) -> int | None:
        return self._meta_u64(b"text_dim")

    @property
    def embedder(self) -> EmbedderLike:
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    # ---- namespaces and sessions ----------------------------------------------------
    def namespaces(self) -> list[str]:
        def fn(txn):
            return [bytes(k).decode() for k, _ in txn.cursor(db=self._db("namespaces"))]
        return self._read(fn)

    def _session_map(self, namespace: str) -> dict[str, SessionInfo]:
        check_name("namespace", namespace)
        db_ns, db_s = self._db("namespaces"), self._db("sessions")

        def fn(txn):
            raw = txn.get(namespace.encode(), db=db_ns)
            if raw is None:
                return None, None
            gen = json.loads(raw)["gen"]
            hit = self._sess_cache.get(namespace)
            if hit is not None and hit[0] == gen:
                return gen, hit[1]
            out = {}
            cur = txn.cursor(db=db_s)
            prefix = namespace.encode() + b"\x00"
            if cur.set_range(prefix):
                for k, v in cur:
                    if not bytes(k).startswith(prefix):
                        break
                    d = json.loads(v)
                    s = bytes(k)[len(prefix):].decode()
                    out[s] = SessionInfo(namespace, s, d["ordinal"], d["count"],
                                         d["first_write"])
            return gen, out

        gen, sessions = self._read(fn)
        if sessions is None:
            raise UnknownNamespaceError(f"unknown namespace {namespace!r}")
        self._sess_cache[namespace] = (gen, sessions)
        return sessions

    def sessions(self, namespace: str) -> list[SessionInfo]:
        """Sessions of ``namespace`` in first-write order."""
        return sorted(self._session_map(namespace).values(), key=lambda s: s.ordinal)

    def _key_order(self) -> dict[tuple[str, str], int]:
        order: dict[tuple[str, str], int] = {}
        for ns in self.namespaces():
            for s in self.sessions(ns):
                order[(ns, s.session)] = len(order)
        return order

    # ---- reading --------------------------------------------------------------------
    def resolve(self, namespace: str, external_ids: Iterable[str]) -> np.ndarray:
        """Internal ids of ``external_ids`` in ``namespace`` (in order); raises
        :class:`UnknownTraceError` naming the unknown ones."""
        check_name("namespace", namespace)
        exts = [check_external_id(e) for e in external_ids]
        db = self._db("ext")

        def fn(txn):
            return [txn.get(L.ext_key(namespace, e), db=db) for e in exts]
        raw = self._read(fn)
        missing = [e for e, r in zip(exts, raw, strict=True) if r is None]
        if missing:
            raise UnknownTraceError(f"unknown external id{'s' * (len(missing) > 1)} "
                                    f"{', '.join(map(repr, missing[:5]))} in {namespace!r}")
        return np.fromiter((L.key_id(r) for r in raw), np.int64, len(raw))

    def get(self, ids: Iterable[int]) -> list[Trace]:
        """Traces by internal id, in the given order, with vectors and latent values."""
        ids = [int(i) for i in ids]
        dbs = self._env.dbs

        def fn(txn):
            out = []
            for i in ids:
                k = L.id_key(i) if 0 <= i < 2**64 else None
                raw = txn.get(k, db=dbs["traces"]) if k else None
                if raw is None:
                    raise UnknownTraceError(f"unknown trace id {i}")
                t = decode_record(i, raw)
                te, lk = txn.get(k, db=dbs["text_vec"]), txn.get(k, db=dbs["latent_vec"])
                t.text_embedding = None if te is None else np.frombuffer(te, np.float32).copy()
                t.latent_key = None if lk is None else np.frombuffer(lk, np.float32).copy()
                out.append(t)
            return out
        return self._read(fn)

    def latent_values(self, ids: Any) -> list[np.ndarray | None]:
        """The latent values of ``ids`` (any shape; e.g. the (n, k) id array of
        ``search_latent``, flattened in row order). Padding ids (< 0) and traces without a
        value give None; unknown ids raise :class:`UnknownTraceError`."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        db = self._db("traces")

        def fn(txn):
            out: list[np.ndarray | None] = []
            for i in flat:
                if i < 0:
                    out.append(None)
                    continue
                raw = txn.get(L.id_key(i), db=db)
                if raw is None:
                    raise UnknownTraceError(f"unknown trace id {i}")
                out.append(decode_record(i, raw).latent_value)
            return out
        return self._read(fn)

    def __len__(self) -> int:
        return self._read(lambda txn: txn.stat(self._db("traces"))["entries"])
