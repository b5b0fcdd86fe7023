"""The change log: which trace ids each committed write removed and (re)wrote.

Every write transaction that changes vectors appends one entry under its new generation::

    changes[generation] = <BII spaces, n_removed, n_written> | removed ids | written ids

(ids as little-endian u64; ``spaces`` is a bit mask of the vector spaces whose vectors the
write touched: 1 text, 2 latent). An index that reflects generation g catches up to the
current generation by replaying the entries after g: it drops every removed or rewritten id
and adds the rows of the ids written and still present, reading their vectors from LMDB. So
a delete, an upsert or a latent re-key costs readers in other processes work proportional to
the change, not a rebuild. ``meta[b"log_floor"]`` is the generation below which entries were
trimmed (by ``compact``); an index older than the floor is rebuilt from LMDB.
"""

from __future__ import annotations

import struct

import numpy as np

from . import layout as L

TEXT, LATENT = 1, 2
SPACE_BITS = {"text": TEXT, "latent": LATENT}
_HEAD = struct.Struct("<BII")


def log_change(txn, dbs, generation: int, removed, written, spaces: int) -> None:
    removed = np.asarray(sorted(set(int(i) for i in removed)), "<u8")
    written = np.asarray(sorted(set(int(i) for i in written)), "<u8")
    if not (len(removed) or len(written)):
        return
    txn.put(L.id_key(generation), _HEAD.pack(spaces, len(removed), len(written))
            + removed.tobytes() + written.tobytes(), db=dbs["changes"])


def log_floor(txn, dbs) -> int:
    return L.u64(txn.get(b"log_floor", db=dbs["meta"]))


def replay(txn, dbs, since: int, space: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids to drop, ids to (re)add) for ``space`` after generation ``since``, or None when
    the log no longer reaches back that far (the index must be rebuilt)."""
    if since < log_floor(txn, dbs):
        return None
    bit = SPACE_BITS[space]
    drop: set[int] = set()
    add: set[int] = set()
    cur = txn.cursor(db=dbs["changes"])
    if cur.set_range(L.id_key(since + 1)):
        for _, v in cur:
            v = bytes(v)
            spaces, nr, nw = _HEAD.unpack_from(v, 0)
            if not spaces & bit:
                continue
            o = _HEAD.size
            removed = np.frombuffer(v, "<u8", nr, o).tolist()
            written = np.frombuffer(v, "<u8", nw, o + 8 * nr).tolist()
            drop.update(removed)
            drop.update(written)
            add.difference_update(removed)
            add.update(written)
    return (np.asarray(sorted(drop), np.int64), np.asarray(sorted(add), np.int64))


def trim(txn, dbs, upto: int) -> int:
    """Delete the entries of generations <= ``upto``; returns how many were deleted."""
    n = 0
    cur = txn.cursor(db=dbs["changes"])
    while cur.first() and L.key_id(cur.key()) <= upto:
        cur.delete()
        n += 1
    txn.put(b"log_floor", L.id_key(max(upto, log_floor(txn, dbs))), db=dbs["meta"])
    return n
