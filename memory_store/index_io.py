"""Saving and loading a ``SpaceIndex`` (``index.py``): generation-stamped, CRC-checked files.

A save merges the delta into the base and drops dead rows, then writes ``vecs-<g>.npy``,
``ids-<g>.npy``, ``times-<g>.npy`` (recorded_at, happened_at) and one ``ann-<g>-<i>.faiss``
per namespace, each to a temp name, fsync'ed and renamed, then ``manifest.json`` (generation,
dim, kind, metric, CRC32 of every file, slice table, HNSW dead sets) the same way; files of
older generations are removed last. A load checks every CRC and returns None on any mismatch,
so a damaged index is rebuilt from LMDB instead of trusted.
"""

from __future__ import annotations

import json
import os

import faiss
import numpy as np

from . import ann as A
from .index import INDEX_FORMAT, IndexConfig, Key, SpaceIndex, file_crc


def save_index(self: SpaceIndex, directory: str, order: dict[Key, int]) -> None:
    """Merge the delta into the base (sorted by ``order``, then id), drop dead rows, write
    every file atomically, then re-open the base memory-mapped."""
    os.makedirs(directory, exist_ok=True)
    rows = self.all_rows()
    self.ensure_ann(rows=rows)
    vecs, ids, keys, rec, hap = rows
    del rows
    rank = np.fromiter((order.get(key, -1) for key in keys), np.int64, len(keys))
    keep = rank >= 0
    perm = np.lexsort((ids, rank))
    perm = perm[keep[perm]]
    if len(perm) != len(ids) or (perm != np.arange(len(perm))).any():  # else: in order already
        vecs, ids, rec, hap = np.ascontiguousarray(vecs[perm]), ids[perm], rec[perm], hap[perm]
    else:
        vecs = np.ascontiguousarray(vecs)
    skeys = [keys[p] for p in perm]
    slices: dict[Key, tuple[int, int]] = {}
    start = 0
    for j in range(1, len(skeys) + 1):
        if j == len(skeys) or skeys[j] != skeys[start]:
            slices[skeys[start]] = (start, j)
            start = j
    g = self.generation
    files: dict[str, int] = {}

    def put(name: str, write) -> None:
        final = os.path.join(directory, name)
        tmp = final + f".tmp{os.getpid()}"
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        files[name] = file_crc(tmp)
        os.replace(tmp, final)

    def save_npy(arr):
        def w(path):
            with open(path, "wb") as f:
                np.save(f, arr)
        return w

    put(f"vecs-{g}.npy", save_npy(vecs))
    put(f"ids-{g}.npy", save_npy(ids))
    put(f"times-{g}.npy", save_npy(np.stack([rec, hap]) if len(ids)
                                   else np.zeros((2, 0), np.float64)))
    ann_files, ann_dead = {}, {}
    for j, (ns, ann) in enumerate(sorted(self.ann.items())):
        name = f"ann-{g}-{j}.faiss"
        put(name, lambda p, a=ann: faiss.write_index(a.index, p))
        ann_files[ns] = name
        ann_dead[ns] = sorted(ann.dead)
    manifest = {"format": INDEX_FORMAT, "generation": g, "dim": self.dim,
                "kind": self.cfg.kind, "metric": self.cfg.metric, "max_id": self.max_id,
                "files": files, "ann": ann_files, "ann_dead": ann_dead,
                "slices": [[k[0], k[1], a, b] for k, (a, b) in slices.items()]}
    tmp = os.path.join(directory, f"manifest.json.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, "manifest.json"))
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    for name in os.listdir(directory):
        if name != "manifest.json" and name not in files:
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass
    del vecs
    self.base_vecs = np.load(os.path.join(directory, f"vecs-{g}.npy"), mmap_mode="r")
    self.base_ids, self.base_rec, self.base_hap, self.slices = ids, rec, hap, slices
    self.base_dead, self.dead_by_key = None, {}
    self._base_sorted = self._starts = None
    self._delta, self._pending = self._empty_delta(), []
    self.codes, self.delta_counts = {}, {}
    self.saved_generation = g

def load_index(cls, directory: str, cfg: IndexConfig, dim: int) -> SpaceIndex | None:
    """Load a saved index, or None if it is missing, of another config or format, or
    corrupt."""
    path = os.path.join(directory, "manifest.json")
    try:
        with open(path) as f:
            m = json.load(f)
        if (m.get("format"), m["dim"], m["kind"], m["metric"]) != (
                INDEX_FORMAT, dim, cfg.kind, cfg.metric):
            return None
        for name, crc in m["files"].items():
            if file_crc(os.path.join(directory, name)) != crc:
                return None
        g = m["generation"]
        vecs = np.load(os.path.join(directory, f"vecs-{g}.npy"), mmap_mode="r")
        ids = np.load(os.path.join(directory, f"ids-{g}.npy"))
        times = np.load(os.path.join(directory, f"times-{g}.npy"))
        if vecs.shape != (len(ids), dim) or times.shape != (2, len(ids)):
            return None
        ix = cls.from_sorted(dim, cfg, g, vecs, ids, times[0], times[1],
                             {(a, b): (s, e) for a, b, s, e in m["slices"]})
        for ns, name in m["ann"].items():
            ix.ann[ns] = A.NamespaceANN(faiss.read_index(os.path.join(directory, name)),
                                        cfg.kind, set(m["ann_dead"].get(ns, [])))
        ix.max_id = max(ix.max_id, int(m["max_id"]))
        ix.saved_generation = g
        return ix
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None
