"""Trace records: the dataclass the store accepts and returns, and its validation.

A :class:`Trace` is one memory item: ``namespace`` (a user, agent or experiment), ``session``
(inside the namespace), ``step`` (position inside the session), ``text`` (always kept, so
vectors can be recomputed when a model changes), an optional ``latent_key`` (float32 vector the
model searches with), an optional ``latent_value`` (an array of any shape and numeric dtype the
model reads back), the ``text_embedding`` (computed by the store's embedder when absent) and a
JSON ``meta`` dict (domain, salience, model_version, speaker, ...).

Identity and time:

* ``id``: the store's internal 64-bit id (assigned by ``add``). ``external_id``: the caller's
  own id, any string of at most 256 UTF-8 bytes, unique within the namespace. Adding a trace
  whose ``external_id`` the namespace already holds is an *upsert*: the new text, vectors and
  meta replace the old under the same internal id and ``version`` counts the writes (1 for the
  first). A session runner that gives every trace ``external_id=f"{session}/{segment}"`` makes
  re-running a session idempotent.
* ``recorded_at``: when the store wrote this version (set by ``add``). ``happened_at``: when
  the content happened or was said (optional; ISO 8601 text, ``datetime`` or epoch seconds;
  kept as epoch seconds, see ``timefmt.py``).
* ``supersedes``: the trace this one corrects (an internal id, or an external id of the same
  namespace); searches can hide superseded traces (``Scope(hide_superseded=True)``).

The byte layout on disk is in ``codec.py``; the LMDB layout in ``layout.py``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DimensionError, InvalidInputError, InvalidNameError, NonFiniteError, TextError
from .timefmt import canonical, iso, parse_time

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,127}$")
MAX_EXTERNAL_ID_BYTES = 256


@dataclass
class Trace:
    """One memory trace (see the module docstring for the identity and time fields)."""

    namespace: str
    session: str
    text: str
    step: int = 0
    latent_key: np.ndarray | None = None
    latent_value: np.ndarray | None = None
    text_embedding: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    recorded_at: float | None = None
    external_id: str | None = None
    happened_at: Any = None
    supersedes: int | str | None = None
    version: int | None = None

    def to_json(self, with_vectors: bool = True) -> dict[str, Any]:
        """A JSON-serialisable dict (times as ISO 8601 UTC; vectors inline as lists, the
        latent value with dtype and shape, unless ``with_vectors`` is False)."""
        out: dict[str, Any] = {
            "trace_id": self.id, "external_id": self.external_id,
            "namespace": self.namespace, "session": self.session, "step": self.step,
            "text": self.text, "meta": self.meta,
            "recorded_at": iso(self.recorded_at),
            "happened_at": iso(parse_time(self.happened_at, "happened_at")),
            "supersedes": self.supersedes, "version": self.version,
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
        """Inverse of :meth:`to_json` (missing fields mean absent; ``created`` is read as
        ``recorded_at`` for files written before it was renamed)."""
        lv = obj.get("latent_value")
        if lv is not None and "data" not in lv:
            lv = None  # a reference into an export's safetensors file (see transfer.py)
        if lv is not None:
            lv = np.asarray(lv["data"], dtype=np.dtype(lv["dtype"])).reshape(lv["shape"])
        lk, te = obj.get("latent_key"), obj.get("text_embedding")
        rec = obj.get("recorded_at", obj.get("created"))
        return cls(
            namespace=obj["namespace"], session=obj["session"], text=obj["text"],
            step=obj.get("step", 0),
            latent_key=None if lk is None else np.asarray(lk, dtype=np.float32),
            latent_value=lv,
            text_embedding=None if te is None else np.asarray(te, dtype=np.float32),
            meta=dict(obj.get("meta") or {}), id=obj.get("trace_id"),
            recorded_at=parse_time(rec, "recorded_at"), external_id=obj.get("external_id"),
            happened_at=obj.get("happened_at"), supersedes=obj.get("supersedes"),
            version=obj.get("version"))


def _fail(cls, field_name: str, message: str):
    return cls(f"{field_name}: {message}", field_name)


def check_name(kind: str, name: Any) -> str:
    """Validate a namespace or session name; raise :class:`InvalidNameError`."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidNameError(
            f"invalid {kind} name {name!r}: use 1-128 characters from [A-Za-z0-9._:@+-], "
            "starting with a letter or digit", kind)
    return name


def check_text(text: Any, max_chars: int) -> str:
    if not isinstance(text, str):
        raise _fail(TextError, "text", f"must be a string, got {type(text).__name__}")
    if not text or text.isspace():
        raise _fail(TextError, "text", "is empty (or only whitespace)")
    if len(text) > max_chars:
        raise _fail(TextError, "text", f"has {len(text)} characters; this store allows "
                    f"{max_chars}")
    return text


def check_external_id(ext: Any) -> str:
    """A caller's id: a non-empty string of at most 256 UTF-8 bytes."""
    if not isinstance(ext, str):
        raise _fail(InvalidInputError, "external_id",
                    f"must be a string, got {type(ext).__name__} {ext!r}")
    if not ext:
        raise _fail(InvalidInputError, "external_id", "is empty")
    size = len(ext.encode("utf-8", "surrogatepass"))
    if size > MAX_EXTERNAL_ID_BYTES:
        raise _fail(InvalidInputError, "external_id",
                    f"has {size} UTF-8 bytes; at most {MAX_EXTERNAL_ID_BYTES} are allowed")
    try:
        ext.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(InvalidInputError, "external_id", "is not valid Unicode") from None
    return ext


def check_id(tid: Any, field_name: str = "id") -> int:
    if isinstance(tid, bool) or not isinstance(tid, (int, np.integer)) or not 0 < tid < 2**63:
        raise _fail(InvalidInputError, field_name, f"an internal trace id must be an int in "
                    f"[1, 2^63), got {tid!r} (give your own string ids as external_id)")
    return int(tid)


def as_vector(v: Any, dim: int | None, what: str) -> np.ndarray:
    """Convert to a contiguous float32 1-d vector, checking dim and finiteness."""
    arr = _vec(v, dim, what)
    if not np.isfinite(arr).all():
        raise _fail(NonFiniteError, what, "contains NaN or infinity")
    return arr


def as_matrix(v: Any, dim: int | None, what: str) -> np.ndarray:
    """Convert to a contiguous float32 (n, dim) matrix (a 1-d vector becomes one row)."""
    try:
        arr = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise _fail(InvalidInputError, what, f"is not numeric: {e}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise _fail(DimensionError, what, f"must be a vector or a (n, dim) matrix, got "
                    f"{arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise _fail(DimensionError, what, f"has dimension {arr.shape[1]}; this store's is {dim}")
    if not np.isfinite(arr).all():
        raise _fail(NonFiniteError, what, "contains NaN or infinity")
    return np.ascontiguousarray(arr)


def check_value(v: Any) -> np.ndarray:
    """A latent value: any shape, numeric or bool dtype, finite."""
    arr = np.asarray(v)
    if arr.dtype.kind not in "biuf":
        raise _fail(InvalidInputError, "latent_value",
                    f"must be numeric or bool, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise _fail(NonFiniteError, "latent_value", "contains NaN or infinity")
    return np.ascontiguousarray(arr)


def check_meta(meta: Any) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise _fail(InvalidInputError, "meta", f"must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise _fail(InvalidInputError, "meta", f"is not JSON-serialisable: {e}") from None
    return meta


def _vec(v: Any, dim: int | None, what: str) -> np.ndarray:
    """Shape/dtype check of one vector (finiteness is checked batch-wise)."""
    arr = v if isinstance(v, np.ndarray) and v.dtype == np.float32 else None
    if arr is None:
        try:
            arr = np.asarray(v, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise _fail(InvalidInputError, what, f"is not a numeric vector: {e}") from None
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise _fail(DimensionError, what, f"must be a non-empty 1-d vector, got shape "
                    f"{arr.shape}")
    if dim is not None and arr.shape[0] != dim:
        raise _fail(DimensionError, what, f"has dimension {arr.shape[0]}; this store's is {dim}")
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


def _one(t: Trace, names: set, max_text_chars: int, latent_dim: int | None,
         text_dim: int | None, now: float | None) -> Trace:
    if not isinstance(t, Trace):
        raise InvalidInputError(f"expected a Trace, got {type(t).__name__}")
    if (t.namespace, t.session) not in names:
        check_name("namespace", t.namespace)
        check_name("session", t.session)
        names.add((t.namespace, t.session))
    check_text(t.text, max_text_chars)
    step = t.step
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise _fail(InvalidInputError, "step", f"must be an int, got {step!r}")
    tid = None if t.id is None else check_id(t.id)
    ext = None if t.external_id is None else check_external_id(t.external_id)
    rec = t.recorded_at
    if rec is not None and not (isinstance(rec, (int, float)) and not isinstance(rec, bool)
                                and math.isfinite(rec)):
        raise _fail(InvalidInputError, "recorded_at", f"must be finite epoch seconds, got {rec!r}")
    happened = parse_time(t.happened_at, "happened_at")
    sup = t.supersedes
    if sup is not None:
        sup = check_external_id(sup) if isinstance(sup, str) else check_id(sup, "supersedes")
    version = t.version
    if version is not None and (isinstance(version, bool) or not isinstance(
            version, (int, np.integer)) or version < 1):
        raise _fail(InvalidInputError, "version", f"must be an int >= 1, got {version!r}")
    lk = None if t.latent_key is None else _vec(t.latent_key, latent_dim, "latent_key")
    te = None if t.text_embedding is None else _vec(t.text_embedding, text_dim, "text_embedding")
    lv = None if t.latent_value is None else check_value(t.latent_value)
    meta = dict(check_meta(t.meta)) if t.meta else {}
    return Trace(t.namespace, t.session, t.text, int(step), lk, lv, te, meta, tid,
                 now if rec is None else canonical(float(rec)), ext, happened, sup,
                 None if version is None else int(version))


def validate_batch(traces: list[Trace], *, max_text_chars: int, latent_dim: int | None,
                   text_dim: int | None, now: float | None = None,
                   stacked: dict | None = None) -> list[Trace]:
    """Normalised copies of ``traces`` or a typed error naming the offending position and
    field; the inputs are not modified. Vectors become float32, ``happened_at`` epoch
    seconds; ``recorded_at`` defaults to ``now``. ``stacked``, if given, receives
    ``{attr: (positions, matrix)}`` of the vectors."""
    out: list[Trace] = []
    names: set[tuple[str, str]] = set()
    now = None if now is None else canonical(now)
    for pos, t in enumerate(traces):
        try:
            out.append(_one(t, names, max_text_chars, latent_dim, text_dim, now))
        except InvalidInputError as e:
            if len(traces) > 1:
                raise type(e)(f"trace {pos}: {e}", e.field) from None
            raise
    for attr in ("latent_key", "text_embedding"):
        rows = [(j, getattr(t, attr)) for j, t in enumerate(out) if getattr(t, attr) is not None]
        if not rows:
            continue
        mat = np.stack([r for _, r in rows])
        if not np.isfinite(mat).all():
            bad = next(j for j, r in rows if not np.isfinite(r).all())
            where = f"trace {bad}: " if len(traces) > 1 else ""
            raise NonFiniteError(f"{where}{attr}: contains NaN or infinity", attr)
        if stacked is not None:
            stacked[attr] = ([j for j, _ in rows], mat)
    return out


def validate(t: Trace, *, max_text_chars: int, latent_dim: int | None,
             text_dim: int | None) -> Trace:
    """Return a normalised copy of ``t`` or raise a typed error; ``t`` is not modified."""
    return validate_batch([t], max_text_chars=max_text_chars, latent_dim=latent_dim,
                          text_dim=text_dim)[0]
