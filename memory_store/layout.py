"""LMDB layout of a store directory, the per-process environment registry and map growth.

Directory::

    <store>/store.json        marker: {"format": "memory_store", "version": N}
    <store>/lmdb/             LMDB environment (the source of truth)
    <store>/writer.lock       flock'ed by the single writer
    <store>/index/<space>/    FAISS/numpy caches, rebuilt from LMDB (see ``index.py``)

LMDB databases (keys are bytes; ids are 8-byte big-endian so key order is id order):

    meta      b"generation" (u64, +1 per committed write), b"mut_generation" (generation of
              the last delete/update, i.e. last change that was not a pure append),
              b"next_id", b"latent_dim", b"text_dim", b"config" (JSON)
    traces    id -> record (``records.encode_record``)
    text_vec  id -> float32 text embedding
    latent_vec id -> float32 latent key
    sessions  ns \\0 session -> JSON {"ordinal", "first_write", "count"}
    namespaces ns -> JSON {"next_ordinal", "created"}
    members   ns \\0 session -> id (dupsort, dupfixed): the ids of a session

An environment is opened once per process per path (LMDB forbids opening it twice) and
shared by every ``TraceStore`` on that path. ``write`` retries a transaction after doubling
the map when LMDB reports the map full, so a long run never fails with MapFullError and the
aborted attempt leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import lmdb

from .errors import FormatVersionError, NotAStoreError, ReadOnlyError

FORMAT_VERSION = 1
MARKER = "store.json"
DB_NAMES = ("meta", "traces", "text_vec", "latent_vec", "sessions", "namespaces", "members")
_U64 = struct.Struct(">Q")
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


def u64(b: bytes | None, default: int = 0) -> int:
    return default if b is None else _U64.unpack(b)[0]


class _Env:
    """One LMDB environment plus its named databases; reference counted per process."""

    def __init__(self, path: str, writable: bool, map_size: int):
        lmdb_dir = os.path.join(path, "lmdb")
        self.writable = writable
        self.env = lmdb.open(lmdb_dir, map_size=map_size, max_dbs=len(DB_NAMES) + 1,
                             readonly=not writable, lock=writable, subdir=True,
                             max_readers=256, create=writable)
        self.dbs = {}
        for name in DB_NAMES:
            dup = name == "members"
            if writable:
                self.dbs[name] = self.env.open_db(name.encode(), dupsort=dup, dupfixed=dup,
                                                  create=True)
            else:
                self.dbs[name] = self.env.open_db(name.encode(), dupsort=dup, dupfixed=dup,
                                                  create=False)
        self.refs = 0
        self.lock = threading.RLock()

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        for _ in range(8):
            try:
                with self.env.begin(buffers=False) as txn:
                    return fn(txn)
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


def init_dir(path: str) -> None:
    """Create an empty store directory (marker last, so a half-made directory is detectable)."""
    os.makedirs(os.path.join(path, "lmdb"), exist_ok=True)
    os.makedirs(os.path.join(path, "index"), exist_ok=True)
    tmp = os.path.join(path, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": "memory_store", "version": FORMAT_VERSION}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MARKER))


def check_dir(path: str, create: bool) -> bool:
    """Validate ``path`` as a store directory; create it when allowed. Returns writability."""
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
    return os.access(path, os.W_OK) and os.access(os.path.join(path, "lmdb"), os.W_OK)


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
            env.env.close()


def meta_json(txn: lmdb.Transaction, db: Any, key: bytes) -> Any:
    raw = txn.get(key, db=db)
    return None if raw is None else json.loads(raw)
