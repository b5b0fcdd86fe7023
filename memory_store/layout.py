"""LMDB layout of a store directory, the per-process environment registry and map growth.

Directory::

    <store>/store.json        marker: {"format": "memory_store", "version": N}
    <store>/lmdb/             LMDB environment (the source of truth)
    <store>/writer.lock       flock'ed by the single writer
    <store>/index/<space>/    FAISS/numpy caches, rebuilt from LMDB (see ``index.py``)

LMDB databases (keys are bytes; ids are 8-byte big-endian so key order is id order):

    meta       b"generation" (u64, +1 per committed write), b"next_id", b"latent_dim",
               b"text_dim", b"config" (JSON), b"log_floor" (see ``changes.py``)
    traces     id -> record (``codec.encode_record``)
    text_vec   id -> float32 text embedding
    latent_vec id -> float32 latent key
    info       id -> <dd recorded_at, happened_at (NaN: none)> + ns \\0 session: what an
               index needs of a trace without decoding its record
    sessions   ns \\0 session -> JSON {"ordinal", "first_write", "count"}
    namespaces ns -> JSON {"next_ordinal", "created", "gen"}
    members    ns \\0 session -> id (dupsort, dupfixed): the ids of a session
    ext        ns \\0 external id -> id: the callers' ids
    superseded ns \\0 id -> id (dupsort, dupfixed): traces that supersede a trace
    changes    generation -> the ids that write removed and (re)wrote (``changes.py``)

An environment is opened once per process per path (LMDB forbids opening it twice) and
shared by every ``TraceStore`` on that path. Readers take LMDB's reader lock (a slot in
``lock.mdb``), so the writer never reuses pages a reader still sees: every read transaction
is a consistent snapshot of the last commit. ``write`` retries a transaction after doubling
the map when LMDB reports the map full, so a long run never fails with MapFullError and the
aborted attempt leaves nothing behind. ``compact`` swaps in a compacted copy of the LMDB
files; other processes notice the new file (its inode) at their next read and reopen it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb

from .errors import FormatVersionError, NotAStoreError, ReadOnlyError

FORMAT_VERSION = 2
MARKER = "store.json"
DUP_DBS = ("members", "superseded")
DB_NAMES = ("meta", "traces", "text_vec", "latent_vec", "info", "sessions", "namespaces",
            "members", "ext", "superseded", "changes")
_U64 = struct.Struct(">Q")
INFO = struct.Struct("<dd")
T = TypeVar("T")

_registry: dict[str, _Env] = {}
_registry_lock = threading.Lock()


def id_key(i: int) -> bytes:
    return _U64.pack(i)


def key_id(b: bytes) -> int:
    return _U64.unpack(b)[0]


def sess_key(ns: str, session: str) -> bytes:
    return ns.encode() + b"\x00" + session.encode()


def split_sess_key(b: bytes) -> tuple[str, str]:
    ns, s = bytes(b).split(b"\x00", 1)
    return ns.decode(), s.decode()


def ext_key(ns: str, external_id: str) -> bytes:
    return ns.encode() + b"\x00" + external_id.encode()


def u64(b: bytes | None, default: int = 0) -> int:
    return default if b is None else _U64.unpack(b)[0]


def encode_info(recorded_at: float, happened_at: float | None, ns: str, session: str) -> bytes:
    return INFO.pack(recorded_at, float("nan") if happened_at is None else happened_at) + \
        sess_key(ns, session)


def decode_info(b: bytes) -> tuple[float, float, tuple[str, str]]:
    """(recorded_at, happened_at or NaN, (namespace, session))."""
    b = bytes(b)
    rec, hap = INFO.unpack_from(b, 0)
    return rec, hap, split_sess_key(b[INFO.size:])


def _open_lmdb(lmdb_dir: str, writable: bool, map_size: int) -> tuple[lmdb.Environment, dict]:
    lock_file = os.path.join(lmdb_dir, "lock.mdb")
    # readers register in lock.mdb so their snapshot pages are never reused; only a
    # read-only directory (no lock file to write) reads without it
    lock = writable or os.access(lock_file, os.W_OK) or (
        not os.path.exists(lock_file) and os.access(lmdb_dir, os.W_OK))
    for attempt in range(50):
        try:
            env = lmdb.open(lmdb_dir, map_size=map_size, max_dbs=len(DB_NAMES) + 1,
                            readonly=not writable, lock=lock, subdir=True, max_readers=512,
                            create=writable)
            break
        except lmdb.Error:
            if attempt == 49 or os.path.exists(os.path.join(lmdb_dir, "data.mdb")):
                raise
            time.sleep(0.02)  # ``compact`` is swapping the files in: they are back at once
    if writable:
        env.reader_check()  # free the reader slots of processes that died
    dbs = {}
    try:
        for name in DB_NAMES:
            dup = name in DUP_DBS
            dbs[name] = env.open_db(name.encode(), dupsort=dup, dupfixed=dup, create=writable)
    except lmdb.NotFoundError:
        env.close()
        raise FormatVersionError(f"{os.path.dirname(lmdb_dir)}: written by an older store "
                                 "format; open it once with mode='w' to upgrade it") from None
    return env, dbs


class _Env:
    """One LMDB environment plus its named databases; reference counted per process."""

    def __init__(self, path: str, writable: bool, map_size: int):
        self.path, self.writable, self.map_size = path, writable, map_size
        self.lmdb_dir = os.path.join(path, "lmdb")
        self.env, self.dbs = _open_lmdb(self.lmdb_dir, writable, map_size)
        self.inode = self._data_inode()
        self.retired: list[lmdb.Environment] = []
        self.refs = 0
        self.lock = threading.RLock()

    def _data_inode(self) -> int:
        try:
            return os.stat(os.path.join(self.lmdb_dir, "data.mdb")).st_ino
        except OSError:
            return -1

    def _follow_compaction(self) -> None:
        """Reopen when ``compact`` (in any process) swapped in a new data file (and not in
        the instant of the swap, when there is none: the old snapshot is still consistent)."""
        if self._data_inode() in (self.inode, -1):
            return
        with self.lock:
            if self._data_inode() in (self.inode, -1):
                return
            self.retired.append(self.env)  # threads may still read the old snapshot
            self.env, self.dbs = _open_lmdb(self.lmdb_dir, self.writable, self.map_size)
            self.inode = self._data_inode()

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        with self.begin() as txn:
            return fn(txn)

    def begin(self) -> lmdb.Transaction:
        """A read transaction (a snapshot of the last commit); the caller closes it."""
        self._follow_compaction()
        for _ in range(8):
            try:
                return self.env.begin(buffers=False)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)  # adopt the size another process grew the map to
        raise lmdb.MapResizedError("map kept resizing during a read")

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        if not self.writable:
            raise ReadOnlyError("the store directory is not writable")
        with self.lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapFullError:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)
                except lmdb.MapResizedError:
                    self.env.set_mapsize(0)

    def compact(self) -> tuple[int, int]:
        """Replace the LMDB files by a compacted copy (the caller holds the writer lock).
        Returns (bytes before, bytes after)."""
        with self.lock:
            before = _dir_bytes(self.lmdb_dir)
            tmp = self.lmdb_dir + ".compact"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            _copy_compact(self.env, self.dbs, tmp, self.env.info()["map_size"])
            _fsync_dir_files(tmp)
            old = self.lmdb_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            self.env.close()
            os.replace(self.lmdb_dir, old)
            os.replace(tmp, self.lmdb_dir)
            _fsync_dir_files(self.path)
            shutil.rmtree(old, ignore_errors=True)
            self.env, self.dbs = _open_lmdb(self.lmdb_dir, True, self.map_size)
            self.inode = self._data_inode()
            return before, _dir_bytes(self.lmdb_dir)

    def close(self) -> None:
        for e in self.retired + [self.env]:
            e.close()


def _copy_compact(env: lmdb.Environment, dbs: dict, dest: str, map_size: int,
                  chunk: int = 100_000) -> None:
    """Copy every database, entry by entry in key order, into a new environment at ``dest``
    (no free pages). LMDB's own compacting copy (``mdb_env_copy2``) crashes on dupfixed
    databases with large duplicate sets, so the copy is done here."""
    out, out_dbs = _open_lmdb(dest, True, map_size)
    try:
        with env.begin(buffers=False) as src:
            for name in DB_NAMES:
                items = src.cursor(db=dbs[name]).iternext(keys=True, values=True)
                while True:
                    batch = [(bytes(k), bytes(v)) for k, v in _take(items, chunk)]
                    if not batch:
                        break
                    with out.begin(write=True) as txn:
                        txn.cursor(db=out_dbs[name]).putmulti(batch, append=True)
        out.sync(True)
    finally:
        out.close()


def _take(it, n: int):
    for _, x in zip(range(n), it, strict=False):
        yield x


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _fsync_dir_files(path: str) -> None:
    for name in os.listdir(path):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(path: str) -> None:
    tmp = os.path.join(path, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": "memory_store", "version": FORMAT_VERSION}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MARKER))


def init_dir(path: str) -> None:
    """Create an empty store directory: the LMDB databases first and the marker last, so a
    reader never finds a marked store without its databases."""
    lmdb_dir = os.path.join(path, "lmdb")
    os.makedirs(lmdb_dir, exist_ok=True)
    os.makedirs(os.path.join(path, "index"), exist_ok=True)
    env, _ = _open_lmdb(lmdb_dir, True, 1 << 20)
    env.close()
    _write_marker(path)


def check_dir(path: str, create: bool) -> tuple[bool, int]:
    """Validate ``path`` as a store directory; create it when allowed. Returns (writability,
    format version on disk)."""
    marker = os.path.join(path, MARKER)
    if not os.path.exists(path):
        if not create:
            raise NotAStoreError(f"{path}: no such store (open with create=True to make one)")
        try:
            os.makedirs(path)
        except OSError as e:
            raise ReadOnlyError(f"{path}: cannot create the store directory: {e}") from None
    if not os.path.isdir(path):
        raise NotAStoreError(f"{path}: not a directory")
    if not os.path.exists(marker):
        if os.listdir(path):
            raise NotAStoreError(f"{path}: a non-empty directory without {MARKER}; "
                                 "not a trace store")
        if not create:
            raise NotAStoreError(f"{path}: empty directory, not a trace store")
        if not os.access(path, os.W_OK):
            raise ReadOnlyError(f"{path}: directory is not writable")
        init_dir(path)
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise NotAStoreError(f"{path}: unreadable {MARKER}: {e}") from None
    if not isinstance(info, dict) or info.get("format") != "memory_store":
        raise NotAStoreError(f"{path}: {MARKER} does not describe a memory_store")
    version = info.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: written by store format version {version}; this code reads up to "
            f"{FORMAT_VERSION} (upgrade the package)")
    writable = os.access(path, os.W_OK) and os.access(os.path.join(path, "lmdb"), os.W_OK)
    return writable, version


def mark_current(path: str) -> None:
    """Record that the store now has this code's format (after an upgrade)."""
    _write_marker(path)


def acquire_env(path: str, writable: bool, map_size: int) -> _Env:
    key = os.path.realpath(path)
    with _registry_lock:
        env = _registry.get(key)
        if env is None or (writable and not env.writable):
            if env is not None and env.refs > 0:
                raise ReadOnlyError(f"{path}: already opened read-only (directory not "
                                    "writable) in this process")
            env = _Env(key, writable, map_size)
            _registry[key] = env
        env.refs += 1
        return env


def release_env(env: _Env) -> None:
    with _registry_lock:
        env.refs -= 1
        if env.refs == 0:
            for k, v in list(_registry.items()):
                if v is env:
                    del _registry[k]
            env.close()


def meta_json(txn: lmdb.Transaction, db: Any, key: bytes) -> Any:
    raw = txn.get(key, db=db)
    return None if raw is None else json.loads(raw)
