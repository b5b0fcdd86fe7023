"""Maintenance for ``TraceStore`` (mixed into it): stats, verify, rebuild, compact.

``verify`` checks LMDB's internal consistency (every record decodes and belongs to a live
session, membership and counts agree, external ids, ``info`` rows and supersede links point at
live traces of their namespace, vectors have the store's dims and are finite, ids are below
``next_id``) and that each index, once synced, holds exactly the LMDB ids of its space in the
right sessions. It returns a :class:`VerifyReport`; it never changes anything.

``compact`` gives disk space back after deletes: the indexes are saved without dead rows
(HNSW graphs holding deleted ids are rebuilt), the change log is trimmed, and the LMDB files
are replaced by a compacted copy (LMDB itself never shrinks its file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import changes as C
from . import layout as L
from .codec import decode_header
from .errors import StoreError
from .index import IndexConfig
from .transfer import TransferMixin


@dataclass
class VerifyReport:
    ok: bool
    traces: int
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{'OK' if self.ok else 'FAILED'}: {self.traces} traces"
        return "\n".join([head] + [f"  - {p}" for p in self.problems[:50]])


class MaintenanceMixin(TransferMixin):
    def stats(self) -> dict[str, Any]:
        """Counts, dims, generation, config, on-disk sizes."""
        dbs = self._env.dbs

        def fn(txn):
            return {name: txn.stat(dbs[name])["entries"] for name in
                    ("traces", "text_vec", "latent_vec", "sessions", "namespaces", "ext",
                     "changes")}
        c = self._read(fn)
        size = 0
        for root, _, files in os.walk(self.path):
            size += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        info = self._env.env.info()
        return {"path": self.path, "traces": c["traces"], "namespaces": c["namespaces"],
                "sessions": c["sessions"], "text_vectors": c["text_vec"],
                "latent_vectors": c["latent_vec"], "external_ids": c["ext"],
                "change_log_entries": c["changes"], "text_dim": self.text_dim,
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
            for k, v in txn.cursor(db=dbs["ext"]):
                ns, ext = bytes(k).split(b"\x00", 1)
                i = L.key_id(v)
                raw = txn.get(v, db=dbs["traces"])
                if raw is None:
                    problems.append(f"external id {ext!r} of {ns.decode()} -> missing trace {i}")
                elif (decode_header(raw)["x"] or "").encode() != ext:
                    problems.append(f"external id {ext!r} -> trace {i} with another id")
            n_info = 0
            for k, v in txn.cursor(db=dbs["info"]):
                n_info += 1
                i = L.key_id(k)
                if members.get(i) != L.decode_info(v)[2]:
                    problems.append(f"info of trace {i} names the wrong session")
            if n_info != n:
                problems.append(f"{n} traces but {n_info} info rows")
            for k, v in txn.cursor(db=dbs["superseded"]):
                ns = bytes(k).split(b"\x00", 1)[0].decode()
                target, by = L.key_id(bytes(k)[len(ns) + 1:]), L.key_id(v)
                if members.get(target, ("",))[0] != ns or members.get(by, ("",))[0] != ns:
                    problems.append(f"supersede link {by} -> {target} leaves {ns!r} or "
                                    "points at a missing trace")
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
            _, ids, keys, _, _ = ix.all_rows()
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
        with self._mu:
            self._rebuild_index(space, kind, **index_params)

    def _rebuild_index(self, space: str | None, kind: str | None, **index_params: Any) -> None:
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

    def compact(self) -> dict[str, int]:
        """Reclaim the disk space of deleted traces (writer only; see the module docstring).
        Returns bytes before and after (LMDB files plus indexes)."""
        self._check_writable()
        with self._mu:
            before = self.stats()["disk_bytes"]
            for space in ("text", "latent"):
                ix = self._index(space)
                if ix is None:
                    continue
                for ns in [ns for ns, a in ix.ann.items() if a.dead]:
                    del ix.ann[ns]  # HNSW graphs cannot drop nodes: rebuilt by the save
                ix.save(self._index_dir(space), self._key_order())
            gen = self.generation
            self._env.write(lambda txn: C.trim(txn, self._env.dbs, gen))
            lmdb_before, lmdb_after = self._env.compact()
            after = self.stats()["disk_bytes"]
        return {"bytes_before": before, "bytes_after": after, "lmdb_bytes_before": lmdb_before,
                "lmdb_bytes_after": lmdb_after}
