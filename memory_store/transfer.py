"""Export and import for ``TraceStore`` (mixed into it): JSON lines plus safetensors vectors.

``export(path)`` writes, from one LMDB snapshot:

* ``path`` (JSON lines): a first line ``{"memory_store_export": 1, "index": ..., "text": ...,
  "latent_dim": ..., "text_dim": ...}``, then one ``Trace.to_json(with_vectors=False)``
  object a line (times as ISO 8601 UTC) plus ``"context"`` (the ids whose text is part of its
  lexical document) and, for its vectors, ``"latent_key_row"`` / ``"text_embedding_row"``
  (rows of the tensors below) and ``"latent_value": {"dtype", "shape", "offset"}``.
* ``vectors_path(path)`` (``x.jsonl`` -> ``x.safetensors``): tensors ``latent_key`` (n, d)
  and ``text_embedding`` (m, e), float32, and one flat ``latent_value.<dtype>`` tensor per
  value dtype (values concatenated; each line's offset and shape cut its value out). The file
  is written streaming, in the standard safetensors layout, so any safetensors reader opens it.

``import_(path)`` validates every line first (a bad line raises an error naming its line and
writes nothing), then adds the traces in batches, keeping internal ids, versions, times and
lexical contexts (``keep_ids=True``), so a store rebuilt from an export searches exactly like
the original. Into an empty store it also adopts the exported text/index configuration.
Older exports (vectors inline as lists) are read too.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import IO, Any

import numpy as np

from . import layout as L
from .codec import _decode, trace_of
from .documents import TextConfig
from .errors import InvalidInputError, UnknownSessionError
from .index import IndexConfig
from .records import Trace, validate_batch

ST_DTYPES = {"<f8": "F64", "<f4": "F32", "<f2": "F16", "<i8": "I64", "<u8": "U64",
             "<i4": "I32", "<u4": "U32", "<i2": "I16", "<u2": "U16", "|i1": "I8",
             "|u1": "U8", "|b1": "BOOL"}


def json_objects(lines: Iterable[str]) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank JSON line; a bad line raises
    :class:`InvalidInputError` naming it."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InvalidInputError(f"line {lineno}: not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise InvalidInputError(f"line {lineno}: expected a JSON object")
        yield lineno, obj


def vectors_path(path: str | os.PathLike) -> str:
    p = os.fspath(path)
    return (p[:-6] if p.endswith(".jsonl") else p) + ".safetensors"


def _le(dtype: np.dtype) -> np.dtype:
    """The little-endian twin of a dtype (safetensors stores little-endian data)."""
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


class TransferMixin:
    def export(self, out: str | os.PathLike | IO[str], namespace: str | None = None, *,
               sessions: Iterable[str] | None = None, ids: Iterable[int | str] | None = None,
               with_vectors: bool = True) -> int:
        """Write traces (all, one namespace, some of its sessions, or some ids: ints are
        internal ids, strings external ids of ``namespace``) as described in the module
        docstring; returns the count. Writing to a stream leaves the vectors out."""
        if not isinstance(out, (str, os.PathLike)) and with_vectors:
            raise InvalidInputError("out: vectors go to a safetensors file beside the JSON "
                                    "lines; give a path, or with_vectors=False", "out")
        with self.snapshot():
            chosen = self._export_ids(namespace, sessions, ids)
            rows = self._read(lambda txn: [_decode(txn.get(L.id_key(i), db=self._db("traces")),
                                                   with_vectors) + (i,) for i in chosen])
            f = open(out, "w") if isinstance(out, (str, os.PathLike)) else out
            try:
                f.write(json.dumps({"memory_store_export": 1,
                                    "index": asdict(self.index_config),
                                    "text": asdict(self.text_config),
                                    "latent_dim": self.latent_dim,
                                    "text_dim": self.text_dim}) + "\n")
                if with_vectors:
                    lines = self._write_vectors(vectors_path(out), rows)
                else:
                    lines = [{} for _ in rows]
                for (h, _, i), extra in zip(rows, lines, strict=True):
                    obj = trace_of(i, h, None).to_json(with_vectors=False)
                    obj["context"] = h["cx"]
                    obj.update(extra)
                    f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            finally:
                if f is not out:
                    f.close()
        return len(rows)

    def _export_ids(self, namespace, sessions, ids) -> list[int]:
        if namespace is None and (sessions is not None or any(
                isinstance(i, str) for i in ids or [])):
            raise InvalidInputError("namespace: sessions and external ids need a namespace",
                                    "namespace")
        if namespace is not None:
            self._session_map(namespace)  # UnknownNamespaceError
        if ids is not None:
            ids = list(ids)
            internal = [int(i) for i in ids if not isinstance(i, str)]
            external = [i for i in ids if isinstance(i, str)]
            chosen = internal + (self.resolve(namespace, external).tolist() if external else [])
            self.get(internal)  # UnknownTraceError
            return sorted(set(chosen))
        out = []
        for ns in [namespace] if namespace else self.namespaces():
            infos = self.sessions(ns)
            if sessions is not None:
                known = {s.session for s in infos}
                wanted = list(sessions)
                missing = [s for s in wanted if s not in known]
                if missing:
                    raise UnknownSessionError(f"unknown session {missing[0]!r} in {ns!r}")
                infos = [s for s in infos if s.session in set(wanted)]
            for info in infos:
                out += self._members(ns, info.session)
        return out

    def _write_vectors(self, path: str, rows: list) -> list[dict[str, Any]]:
        """Stream the vectors of ``rows`` into a safetensors file; returns per-trace refs."""
        dbs = self._env.dbs
        lk_dim, te_dim = self.latent_dim, self.text_dim
        refs: list[dict[str, Any]] = []
        n_lk = n_te = 0
        value_len: dict[str, int] = {}
        present = self._read(lambda txn: [(txn.get(L.id_key(i), db=dbs["latent_vec"]) is not None,
                                           txn.get(L.id_key(i), db=dbs["text_vec"]) is not None)
                                          for _, _, i in rows])
        for (_, lv, _), (has_lk, has_te) in zip(rows, present, strict=True):
            ref: dict[str, Any] = {"latent_key_row": None, "text_embedding_row": None}
            if has_lk:
                ref["latent_key_row"], n_lk = n_lk, n_lk + 1
            if has_te:
                ref["text_embedding_row"], n_te = n_te, n_te + 1
            if lv is not None:
                dt = _le(lv.dtype).str
                if dt not in ST_DTYPES:
                    raise InvalidInputError(f"latent_value: dtype {lv.dtype} has no "
                                            "safetensors type", "latent_value")
                ref["latent_value"] = {"dtype": lv.dtype.str, "shape": list(lv.shape),
                                       "offset": value_len.get(dt, 0)}
                value_len[dt] = value_len.get(dt, 0) + lv.size
            refs.append(ref)
        tensors: dict[str, tuple[str, list[int], int]] = {}  # name -> dtype, shape, bytes
        if n_lk:
            tensors["latent_key"] = ("F32", [n_lk, lk_dim], n_lk * lk_dim * 4)
        if n_te:
            tensors["text_embedding"] = ("F32", [n_te, te_dim], n_te * te_dim * 4)
        for dt, n in sorted(value_len.items()):
            tensors[f"latent_value.{dt}"] = (ST_DTYPES[dt], [n], n * np.dtype(dt).itemsize)
        header: dict[str, Any] = {"__metadata__": {"format": "memory_store-export",
                                                   "version": "1"}}
        offset, start = 0, {}
        for name, (dt, shape, size) in tensors.items():
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + size]}
            start[name] = offset
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        base = 8 + len(raw)
        pos = {name: base + off for name, off in start.items()}
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(base + offset)

            def put(name: str, data: bytes) -> None:
                f.seek(pos[name])
                f.write(data)
                pos[name] += len(data)

            def fn(txn):
                for (_, lv, i), ref in zip(rows, refs, strict=True):
                    k = L.id_key(i)
                    if ref["latent_key_row"] is not None:
                        put("latent_key", bytes(txn.get(k, db=dbs["latent_vec"])))
                    if ref["text_embedding_row"] is not None:
                        put("text_embedding", bytes(txn.get(k, db=dbs["text_vec"])))
                    if lv is not None:
                        le = lv.astype(_le(lv.dtype), copy=False)
                        put(f"latent_value.{le.dtype.str}", le.tobytes())
            self._read(fn)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return refs

    def import_(self, src: str | os.PathLike | IO[str] | Iterable[str],
                keep_ids: bool = True, batch_size: int = 10_000) -> np.ndarray:
        """Add the traces of an export (see the module docstring); returns their ids.
        ``keep_ids=False`` assigns new internal ids (external ids still upsert)."""
        self._check_writable()
        vec_file = vectors_path(src) if isinstance(src, (str, os.PathLike)) else None
        f = open(src) if isinstance(src, (str, os.PathLike)) else src
        try:
            header, items = self._parse_export(f)
        finally:
            if f is not src:
                f.close()
        tensors = self._load_tensors(vec_file, items)
        traces, contexts = [], []
        for lineno, obj in items:
            try:
                t = Trace.from_json(obj)
                for name in ("latent_key", "text_embedding"):
                    row = obj.get(name + "_row")
                    if row is not None:
                        setattr(t, name, tensors[name][row])
                lv = obj.get("latent_value")
                if isinstance(lv, dict) and "offset" in lv:
                    dtype = np.dtype(lv["dtype"])
                    flat = tensors[f"latent_value.{_le(dtype).str}"]
                    size = int(np.prod(lv["shape"], dtype=np.int64))
                    part = flat[lv["offset"]:lv["offset"] + size]
                    if len(part) != size:
                        raise ValueError("latent_value runs past the end of its tensor")
                    t.latent_value = part.astype(dtype).reshape(lv["shape"])
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise InvalidInputError(f"line {lineno}: {e}") from None
            if not keep_ids:
                t.id = None
                if isinstance(t.supersedes, int):
                    raise InvalidInputError(f"line {lineno}: supersedes: an internal id cannot "
                                            "be kept with keep_ids=False", "supersedes")
            traces.append(t)
            contexts.append(obj.get("context") if keep_ids else None)
        with self._mu:
            if header and self.generation == 0:
                self._adopt_config(header)
            self._validate_import(traces)
            out = [np.zeros(0, np.int64)]
            for s in range(0, len(traces), batch_size):
                out.append(self._add(traces[s:s + batch_size], contexts[s:s + batch_size]))
        return np.concatenate(out)

    @staticmethod
    def _parse_export(f) -> tuple[dict | None, list[tuple[int, dict]]]:
        header, items = None, []
        for lineno, obj in json_objects(f):
            if "memory_store_export" in obj:
                header = obj
                continue
            items.append((lineno, obj))
        return header, items

    @staticmethod
    def _load_tensors(path: str | None, items) -> dict[str, np.ndarray]:
        if not any(o.get("latent_key_row") is not None or o.get("text_embedding_row")
                   is not None or "offset" in (o.get("latent_value") or {}) for _, o in items):
            return {}
        if path is None or not os.path.exists(path):
            raise InvalidInputError(f"the JSON lines refer to vectors but {path} is missing")
        from safetensors import safe_open

        try:
            with safe_open(path, framework="numpy") as st:
                return {name: st.get_tensor(name) for name in st.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise InvalidInputError(f"{path}: not a readable safetensors file: {e}") from None

    def _adopt_config(self, header: dict) -> None:
        idx = IndexConfig(**header.get("index") or {})
        txt = TextConfig(**header.get("text") or {})
        latent_dim = header.get("latent_dim")

        def fn(txn):
            m = self._db("meta")
            txn.put(b"config", json.dumps({"index": asdict(idx), "text": asdict(txt)}).encode(),
                    db=m)
            if latent_dim is not None:
                txn.put(b"latent_dim", L.id_key(int(latent_dim)), db=m)
        self._env.write(fn)
        self.index_config, self.text_config = idx, txt

    def _validate_import(self, traces: list[Trace]) -> None:
        """Everything that would fail a later batch fails now, before any write."""
        validate_batch(traces, max_text_chars=self.text_config.max_text_chars,
                       latent_dim=self.latent_dim, text_dim=self.text_dim)
        ids = [t.id for t in traces if t.id is not None]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("id: repeated internal ids in the import", "id")
        db = self._db("traces")
        taken = self._read(lambda txn: [i for i in ids if isinstance(i, int) and 0 < i < 2**63
                                        and txn.get(L.id_key(i), db=db) is not None])
        if taken:
            raise InvalidInputError(f"id: traces {taken[:5]} are already in the store (import "
                                    "into an empty store, or keep_ids=False)", "id")

    def _members(self, ns: str, session: str) -> list[int]:
        db = self._db("members")

        def fn(txn):
            cur = txn.cursor(db=db)
            if not cur.set_key(L.sess_key(ns, session)):
                return []
            return [L.key_id(v) for v in cur.iternext_dup(keys=False)]
        return self._read(fn)
