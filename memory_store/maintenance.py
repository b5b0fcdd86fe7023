"""Maintenance for ``TraceStore`` (mixed into it): stats, verify, rebuild, export/import.

``verify`` checks LMDB's internal consistency (every record decodes and belongs to a live
session, membership and counts agree, vectors have the store's dims and are finite, ids are
below ``next_id``) and that each index, once synced, holds exactly the LMDB ids of its space
in the right sessions. It returns a :class:`VerifyReport`; it never changes anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from . import layout as L
from .errors import InvalidInputError, StoreError
from .index import IndexConfig
from .records import Trace, decode_header


@dataclass
class VerifyReport:
    ok: bool
    traces: int
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{'OK' if self.ok else 'FAILED'}: {self.traces} traces"
        return "\n".join([head] + [f"  - {p}" for p in self.problems[:50]])


class MaintenanceMixin:
    def stats(self) -> dict[str, Any]:
        """Counts, dims, generation, config, on-disk sizes."""
        dbs = self._env.dbs

        def fn(txn):
            return {name: txn.stat(dbs[name])["entries"] for name in
                    ("traces", "text_vec", "latent_vec", "sessions", "namespaces")}
        c = self._read(fn)
        size = 0
        for root, _, files in os.walk(self.path):
            size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        info = self._env.env.info()
        return {"path": self.path, "traces": c["traces"], "namespaces": c["namespaces"],
                "sessions": c["sessions"], "text_vectors": c["text_vec"],
                "latent_vectors": c["latent_vec"], "text_dim": self.text_dim,
                "latent_dim": self.latent_dim, "generation": self.generation,
                "index": vars(self.index_config), "map_size": info["map_size"],
                "disk_bytes": size}

    def verify(self) -> VerifyReport:
        dbs = self._env.dbs
        problems: list[str] = []

        def fn(txn):
            m = dbs["meta"]
            next_id = L.u64(txn.get(b"next_id", db=m), 1)
            dims = {s: txn.get(s.encode() + b"_dim", db=m) for s in ("text", "latent")}
            sessions = {}
            for k, v in txn.cursor(db=dbs["sessions"]):
                sessions[L.split_sess_key(k)] = json.loads(v)
            nss = {bytes(k).decode() for k, _ in txn.cursor(db=dbs["namespaces"])}
            members: dict[int, tuple[str, str]] = {}
            counts: dict[tuple[str, str], int] = {}
            cur = txn.cursor(db=dbs["members"])
            for k, v in cur.iternext(keys=True, values=True):
                key = L.split_sess_key(k)
                i = L.key_id(v)
                if i in members:
                    problems.append(f"trace {i} is a member of two sessions")
                members[i] = key
                counts[key] = counts.get(key, 0) + 1
            for key, d in sessions.items():
                if counts.get(key, 0) != d["count"]:
                    problems.append(f"session {key} count {d['count']} but "
                                    f"{counts.get(key, 0)} members")
                if key[0] not in nss:
                    problems.append(f"session {key} of unknown namespace")
            n = 0
            for k, v in txn.cursor(db=dbs["traces"]):
                n += 1
                i = L.key_id(k)
                try:
                    h = decode_header(v)
                except (ValueError, KeyError) as e:
                    problems.append(f"trace {i} does not decode: {e}")
                    continue
                if i >= next_id:
                    problems.append(f"trace {i} >= next_id {next_id}")
                if members.get(i) != (h["ns"], h["s"]):
                    problems.append(f"trace {i} not a member of its session {h['s']!r}")
            if n != len(members):
                problems.append(f"{n} traces but {len(members)} memberships")
            for space in ("text", "latent"):
                dim = None if dims[space] is None else L.u64(dims[space])
                for k, v in txn.cursor(db=dbs[space + "_vec"]):
                    i = L.key_id(k)
                    if i not in members:
                        problems.append(f"{space} vector of missing trace {i}")
                    vec = np.frombuffer(v, np.float32)
                    if dim is None or len(vec) != dim:
                        problems.append(f"{space} vector of {i} has dim {len(vec)} != {dim}")
                    elif not np.isfinite(vec).all():
                        problems.append(f"{space} vector of {i} is not finite")
            return n, members

        n, members = self._read(fn)
        for space in ("text", "latent"):
            try:
                ix = self._index(space)
            except StoreError as e:
                problems.append(f"{space} index: {e}")
                continue
            if ix is None:
                continue
            vdb = dbs[space + "_vec"]
            want = self._read(lambda txn, vdb=vdb: {L.key_id(k) for k, _ in txn.cursor(db=vdb)})
            vecs, ids, keys = ix.all_rows()
            got = dict(zip(ids.tolist(), keys, strict=False))
            if len(got) != len(ids):
                problems.append(f"{space} index has duplicate ids")
            if set(got) != want:
                problems.append(f"{space} index ids differ from LMDB: "
                                f"{len(set(got) - want)} extra, {len(want - set(got))} missing")
            wrong = [i for i, key in got.items() if i in members and members[i] != key]
            if wrong:
                problems.append(f"{space} index puts {len(wrong)} traces in the wrong session")
        return VerifyReport(not problems, n, problems)

    def rebuild_index(self, space: str | None = None, kind: str | None = None,
                      **index_params: Any) -> None:
        """Rebuild the index of ``space`` (both when None) from LMDB; ``kind`` and other
        ``IndexConfig`` fields change the store's index configuration (writer only)."""
        self._check_writable()
        if kind is not None or index_params:
            cfg = dict(vars(self.index_config))
            cfg.update(index_params)
            if kind is not None:
                cfg["kind"] = kind
            new = IndexConfig(**cfg)

            def fn(txn):
                m = self._db("meta")
                conf = json.loads(txn.get(b"config", db=m))
                conf["index"] = vars(new)
                txn.put(b"config", json.dumps(conf).encode(), db=m)
            self._env.write(fn)
            self.index_config = new
        for sp in ([space] if space else ["text", "latent"]):
            self._ix[sp] = None
            dim = self._meta_u64(sp.encode() + b"_dim")
            if dim is None:
                continue
            ix = self._build_index(sp, dim)
            ix.ensure_ann()
            ix.save(self._index_dir(sp), self._key_order())
            self._ix[sp] = ix

    def export(self, out: str | os.PathLike | IO[str], namespace: str | None = None,
               with_vectors: bool = True) -> int:
        """Write traces as JSON lines (one ``Trace.to_json`` object a line); returns count."""
        if namespace is not None:
            self._session_map(namespace)  # UnknownNamespaceError
        f = open(out, "w") if isinstance(out, (str, os.PathLike)) else out
        n = 0
        try:
            for ns in [namespace] if namespace else self.namespaces():
                for info in self.sessions(ns):
                    for t in self.get(self._members(ns, info.session)):
                        f.write(json.dumps(t.to_json(with_vectors)) + "\n")
                        n += 1
        finally:
            if f is not out:
                f.close()
        return n

    def _members(self, ns: str, session: str) -> list[int]:
        db = self._db("members")

        def fn(txn):
            cur = txn.cursor(db=db)
            if not cur.set_key(L.sess_key(ns, session)):
                return []
            return [L.key_id(v) for v in cur.iternext_dup(keys=False)]
        return self._read(fn)

    def import_(self, src: str | os.PathLike | IO[str] | Iterable[str],
                keep_ids: bool = True, batch_size: int = 10_000) -> np.ndarray:
        """Add traces from JSON lines written by :meth:`export`. The whole file is parsed
        and validated before anything is written; returns the new ids."""
        self._check_writable()
        f = open(src) if isinstance(src, (str, os.PathLike)) else src
        traces = []
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    t = Trace.from_json(json.loads(line))
                except (ValueError, KeyError, TypeError) as e:
                    raise InvalidInputError(f"line {lineno}: {e}") from None
                if not keep_ids:
                    t.id = None
                traces.append(t)
        finally:
            if f is not src:
                f.close()
        return self.add(traces)
