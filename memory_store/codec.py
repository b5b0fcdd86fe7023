"""Byte layout of a trace record in LMDB (vectors are stored separately, see ``layout.py``).

Version 2 (written now)::

    <BHHIHqdIdIQH> version, len(ns), len(session), len(text), n_context, step, recorded_at,
                   len(meta JSON), happened_at (NaN: none), version count, supersedes (0: none),
                   len(external id)
    | ns | session | external id | text (UTF-8) | n_context x u64 ids | meta JSON (absent
    when empty) | [<BB> len(dtype), ndim | dtype str | ndim x u64 shape | raw latent_value]

Version 1 (read only) lacked the external id, happened_at, version count and supersedes.
``context``: ids of the earlier traces of the same session whose text is part of this
trace's lexical document (see ``documents.py``).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from .records import Trace

_HEAD1 = struct.Struct("<BHHIHqdI")
_HEAD2 = struct.Struct("<BHHIHqdIdIQH")
_LV = struct.Struct("<BB")  # |dtype str|, ndim
RECORD_VERSION = 2


def encode_record(t: Trace, context: list[int] | tuple[int, ...] = ()) -> bytes:
    """The record of a validated trace whose ``supersedes`` is resolved to an internal id."""
    ns, se, tx = t.namespace.encode(), t.session.encode(), t.text.encode()
    ext = b"" if t.external_id is None else t.external_id.encode()
    meta = json.dumps(t.meta, separators=(",", ":"), ensure_ascii=False).encode() if t.meta \
        else b""
    happened = math.nan if t.happened_at is None else float(t.happened_at)
    parts = [_HEAD2.pack(RECORD_VERSION, len(ns), len(se), len(tx), len(context), t.step,
                         t.recorded_at or 0.0, len(meta), happened, t.version or 1,
                         t.supersedes or 0, len(ext)), ns, se, ext, tx]
    if context:
        parts.append(struct.pack(f"<{len(context)}Q", *context))
    parts.append(meta)
    lv = t.latent_value
    if lv is not None:
        dt = lv.dtype.str.encode()
        parts += [_LV.pack(len(dt), lv.ndim), dt, struct.pack(f"<{lv.ndim}Q", *lv.shape),
                  lv.tobytes()]
    return b"".join(parts)


def _decode(buf: bytes, with_value: bool) -> tuple[dict[str, Any], np.ndarray | None]:
    buf = bytes(buf)
    ver = buf[0]
    ext = ""
    if ver == 2:
        (_, lns, ls, lt, nctx, step, rec, lm, happened, version, sup,
         lx) = _HEAD2.unpack_from(buf, 0)
        o = _HEAD2.size
    elif ver == 1:
        _, lns, ls, lt, nctx, step, rec, lm = _HEAD1.unpack_from(buf, 0)
        happened, version, sup, lx = math.nan, 1, 0, 0
        o = _HEAD1.size
    else:
        raise ValueError(f"record version {ver} is not 1 or {RECORD_VERSION}")
    ns = buf[o:o + lns].decode()
    o += lns
    se = buf[o:o + ls].decode()
    o += ls
    if lx:
        ext = buf[o:o + lx].decode()
        o += lx
    tx = buf[o:o + lt].decode()
    o += lt
    cx = list(struct.unpack_from(f"<{nctx}Q", buf, o)) if nctx else []
    o += 8 * nctx
    meta = json.loads(buf[o:o + lm]) if lm else {}
    o += lm
    lv, lv_info = None, None
    if o < len(buf):
        ldt, ndim = _LV.unpack_from(buf, o)
        o += _LV.size
        dtype = np.dtype(buf[o:o + ldt].decode())
        o += ldt
        shape = struct.unpack_from(f"<{ndim}Q", buf, o)
        o += 8 * ndim
        lv_info = [dtype.str, list(shape)]
        if with_value:
            lv = np.frombuffer(buf, dtype=dtype, offset=o,
                               count=int(np.prod(shape, dtype=np.int64))).reshape(shape).copy()
    head = {"ns": ns, "s": se, "st": step, "t": tx, "m": meta, "c": rec or None,
            "cx": cx, "lv": lv_info, "x": ext or None,
            "h": None if math.isnan(happened) else happened, "v": version, "sup": sup or None}
    return head, lv


def decode_record(tid: int, buf: bytes) -> Trace:
    h, lv = _decode(buf, True)
    return trace_of(tid, h, lv)


def trace_of(tid: int, h: dict[str, Any], lv: np.ndarray | None) -> Trace:
    """A :class:`Trace` from a decoded header (vectors not attached)."""
    return Trace(namespace=h["ns"], session=h["s"], text=h["t"], step=h["st"], meta=h["m"],
                 latent_value=lv, id=tid, recorded_at=h["c"], external_id=h["x"],
                 happened_at=h["h"], supersedes=h["sup"], version=h["v"])


def decode_header(buf: bytes) -> dict[str, Any]:
    """Record fields without the value: keys ns, s, st, t, m, c (recorded_at), cx (context
    ids), lv ([dtype, shape] or None), x (external id), h (happened_at), v (version count),
    sup (superseded id)."""
    return _decode(buf, False)[0]
