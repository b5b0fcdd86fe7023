"""Trace records: the dataclass the store accepts and returns, its validation and byte codec.

A :class:`Trace` is one memory item: ``namespace`` (a user, agent or experiment), ``session``
(inside the namespace), ``step`` (position inside the session), ``text`` (always kept, so
vectors can be recomputed when a model changes), an optional ``latent_key`` (float32 vector the
model searches with), an optional ``latent_value`` (an array of any shape and numeric dtype the
model reads back), the ``text_embedding`` (computed by the store's embedder when absent) and a
JSON ``meta`` dict (domain, salience, model_version, time, speaker, ...).

On disk (see ``layout.py``) the vectors live in their own LMDB databases as raw float32 bytes;
the record itself is a compact binary layout (``encode_record``) with the meta as JSON.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DimensionError, InvalidInputError, InvalidNameError, NonFiniteError, TextError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,127}$")


@dataclass
class Trace:
    """One memory trace. ``id`` is assigned by :meth:`TraceStore.add` (or given explicitly)."""

    namespace: str
    session: str
    text: str
    step: int = 0
    latent_key: np.ndarray | None = None
    latent_value: np.ndarray | None = None
    text_embedding: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    created: float | None = None

    def to_json(self, with_vectors: bool = True) -> dict[str, Any]:
        """A JSON-serialisable dict (vectors as lists, latent_value with dtype and shape)."""
        out: dict[str, Any] = {
            "trace_id": self.id,
            "namespace": self.namespace,
            "session": self.session,
            "step": self.step,
            "text": self.text,
            "meta": self.meta,
            "created": self.created,
        }
        if with_vectors:
            for name in ("latent_key", "text_embedding"):
                v = getattr(self, name)
                out[name] = None if v is None else [float(x) for x in v]
            lv = self.latent_value
            out["latent_value"] = None if lv is None else {
                "dtype": lv.dtype.str, "shape": list(lv.shape), "data": lv.ravel().tolist()}
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Trace:
        """Inverse of :meth:`to_json` (missing vector fields mean absent)."""
        lv = obj.get("latent_value")
        if lv is not None:
            lv = np.asarray(lv["data"], dtype=np.dtype(lv["dtype"])).reshape(lv["shape"])
        lk, te = obj.get("latent_key"), obj.get("text_embedding")
        return cls(
            namespace=obj["namespace"], session=obj["session"], text=obj["text"],
            step=int(obj.get("step", 0)),
            latent_key=None if lk is None else np.asarray(lk, dtype=np.float32),
            latent_value=lv,
            text_embedding=None if te is None else np.asarray(te, dtype=np.float32),
            meta=dict(obj.get("meta") or {}),
            id=obj.get("trace_id"), created=obj.get("created"),
        )


def check_name(kind: str, name: Any) -> str:
    """Validate a namespace or session name; raise :class:`InvalidNameError`."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidNameError(
            f"invalid {kind} name {name!r}: use 1-128 characters from [A-Za-z0-9._:@+-], "
            "starting with a letter or digit")
    return name


def check_text(text: Any, max_chars: int) -> str:
    if not isinstance(text, str):
        raise TextError(f"trace text must be a string, got {type(text).__name__}")
    if not text or text.isspace():
        raise TextError("trace text is empty (or only whitespace)")
    if len(text) > max_chars:
        raise TextError(f"trace text has {len(text)} characters; this store allows {max_chars}")
    return text


def as_vector(v: Any, dim: int | None, what: str) -> np.ndarray:
    """Convert to a contiguous float32 1-d vector, checking dim and finiteness."""
    arr = _vec(v, dim, what)
    if not np.isfinite(arr).all():
        raise NonFiniteError(f"{what} contains NaN or infinity")
    return arr


def as_matrix(v: Any, dim: int | None, what: str) -> np.ndarray:
    """Convert to a contiguous float32 (n, dim) matrix (a 1-d vector becomes one row)."""
    try:
        arr = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{what} is not numeric: {e}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise DimensionError(f"{what} must be a vector or a (n, dim) matrix, got {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise DimensionError(f"{what} has dimension {arr.shape[1]}; this store's is {dim}")
    if not np.isfinite(arr).all():
        raise NonFiniteError(f"{what} contains NaN or infinity")
    return np.ascontiguousarray(arr)


def check_value(v: Any) -> np.ndarray:
    """A latent value: any shape, numeric or bool dtype, finite."""
    arr = np.asarray(v)
    if arr.dtype.kind not in "biuf":
        raise InvalidInputError(f"latent_value must be numeric or bool, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise NonFiniteError("latent_value contains NaN or infinity")
    return np.ascontiguousarray(arr)


def check_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise InvalidInputError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"meta is not JSON-serialisable: {e}") from None
    return meta


def _vec(v: Any, dim: int | None, what: str) -> np.ndarray:
    """Shape/dtype check of one vector (finiteness is checked batch-wise)."""
    arr = v if isinstance(v, np.ndarray) and v.dtype == np.float32 else None
    if arr is None:
        try:
            arr = np.asarray(v, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"{what} is not a numeric vector: {e}") from None
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise DimensionError(f"{what} must be a non-empty 1-d vector, got shape {arr.shape}")
    if dim is not None and arr.shape[0] != dim:
        raise DimensionError(f"{what} has dimension {arr.shape[0]}; this store's is {dim}")
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def validate_batch(traces: list[Trace], *, max_text_chars: int, latent_dim: int | None,
                   text_dim: int | None, now: float | None = None,
                   stacked: dict | None = None) -> list[Trace]:
    """Normalised copies of ``traces`` or a typed error naming the offending position; the
    inputs are not modified. Vectors become float32; ``created`` defaults to ``now``.
    ``stacked``, if given, receives ``{attr: (positions, matrix)}`` of the vectors."""
    out: list[Trace] = []
    names: set[tuple[str, str]] = set()
    for pos, t in enumerate(traces):
        where = f"trace {pos}: " if len(traces) > 1 else ""
        try:
            if not isinstance(t, Trace):
                raise InvalidInputError(f"expected a Trace, got {type(t).__name__}")
            if (t.namespace, t.session) not in names:
                check_name("namespace", t.namespace)
                check_name("session", t.session)
                names.add((t.namespace, t.session))
            check_text(t.text, max_text_chars)
            step, tid, created = t.step, t.id, t.created
            if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
                raise InvalidInputError(f"step must be an int, got {step!r}")
            if tid is not None and (isinstance(tid, bool) or not isinstance(
                    tid, (int, np.integer)) or not 0 < tid < 2**63):
                raise InvalidInputError(f"trace id must be an int in [1, 2^63), got {tid!r}")
            if created is not None and not (isinstance(created, (int, float))
                                            and math.isfinite(created)):
                raise InvalidInputError(f"created must be a finite number, got {created!r}")
            lk = None if t.latent_key is None else _vec(t.latent_key, latent_dim, "latent_key")
            te = None if t.text_embedding is None else _vec(t.text_embedding, text_dim,
                                                             "text_embedding")
            lv = None if t.latent_value is None else check_value(t.latent_value)
            meta = dict(check_meta(t.meta)) if t.meta else {}
        except InvalidInputError as e:
            raise type(e)(where + str(e)) from None
        out.append(Trace(t.namespace, t.session, t.text, int(step), lk, lv, te, meta,
                         None if tid is None else int(tid),
                         now if created is None else float(created)))
    for attr in ("latent_key", "text_embedding"):
        rows = [(j, getattr(t, attr)) for j, t in enumerate(out) if getattr(t, attr) is not None]
        if not rows:
            continue
        mat = np.stack([r for _, r in rows])
        if not np.isfinite(mat).all():
            bad = next(j for j, r in rows if not np.isfinite(r).all())
            where = f"trace {bad}: " if len(traces) > 1 else ""
            raise NonFiniteError(f"{where}{attr} contains NaN or infinity")
        if stacked is not None:
            stacked[attr] = ([j for j, _ in rows], mat)
    return out


def validate(t: Trace, *, max_text_chars: int, latent_dim: int | None,
             text_dim: int | None) -> Trace:
    """Return a normalised copy of ``t`` or raise a typed error; ``t`` is not modified."""
    return validate_batch([t], max_text_chars=max_text_chars, latent_dim=latent_dim,
                          text_dim=text_dim)[0]


_HEAD = struct.Struct("<BHHIHqdI")  # version, |ns|, |s|, |text|, n_ctx, step, created, |meta|
_LV = struct.Struct("<BB")  # |dtype str|, ndim
RECORD_VERSION = 1


def encode_record(t: Trace, context: list[int] | tuple[int, ...] = ()) -> bytes:
    """Binary record (vectors are stored separately)::

        <BHHIHqdI> version, len(ns), len(session), len(text), n_context, step, created,
                   len(meta JSON) | ns | session | text (UTF-8) | n_context x u64 ids
                   | meta JSON (absent when empty) | [<BB> len(dtype), ndim | dtype str
                   | ndim x u64 shape | raw latent_value bytes]  (only with a latent_value)

    ``context``: ids of the earlier traces whose text is part of this trace's lexical
    document."""
    ns, se, tx = t.namespace.encode(), t.session.encode(), t.text.encode()
    meta = json.dumps(t.meta, separators=(",", ":"), ensure_ascii=False).encode() if t.meta \
        else b""
    parts = [_HEAD.pack(RECORD_VERSION, len(ns), len(se), len(tx), len(context), t.step,
                        t.created or 0.0, len(meta)), ns, se, tx]
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
    ver, lns, ls, lt, nctx, step, created, lm = _HEAD.unpack_from(buf, 0)
    if ver != RECORD_VERSION:
        raise ValueError(f"record version {ver} is not {RECORD_VERSION}")
    o = _HEAD.size
    ns = buf[o:o + lns].decode()
    o += lns
    se = buf[o:o + ls].decode()
    o += ls
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
    head = {"ns": ns, "s": se, "st": step, "t": tx, "m": meta, "c": created or None,
            "cx": cx, "lv": lv_info}
    return head, lv


def decode_record(tid: int, buf: bytes) -> Trace:
    h, lv = _decode(buf, True)
    return Trace(namespace=h["ns"], session=h["s"], text=h["t"], step=h["st"], meta=h["m"],
                 latent_value=lv, id=tid, created=h["c"])


def decode_header(buf: bytes) -> dict[str, Any]:
    """Record fields without the value: keys ns, s, st, t, m, c, cx, lv ([dtype, shape])."""
    return _decode(buf, False)[0]
