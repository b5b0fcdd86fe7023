"""Test helpers: random traces, a hashing embedder and an in-RAM dict model of the store (the
reference). Imported by module name: ``conftest`` is ambiguous across test folders."""

from __future__ import annotations

import hashlib
import re

import numpy as np

from memory_store import Trace


class HashEmbedder:
    """Bag-of-words hashing embedder (deterministic, no model): similar words, similar vectors."""

    name = "hash"
    dim = 32

    def __init__(self):
        self.calls = 0
        self.encoded = 0

    def encode(self, texts):
        self.calls += 1
        self.encoded += len(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        for j, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9]+", t.lower()):
                h = int(hashlib.md5(w.encode()).hexdigest(), 16)
                out[j, h % self.dim] += 1.0 if (h >> 8) % 2 else -1.0
            n = np.linalg.norm(out[j])
            out[j] = out[j] / n if n else out[j]
        return out


class DictModel:
    def __init__(self):
        self.traces = {}  # id -> Trace (with id)
        self.order = {}  # ns -> [session, ...] in first-write order

    def add(self, traces, ids):
        for t, i in zip(traces, ids, strict=False):
            t = type(t)(**{**t.__dict__, "id": int(i)})
            self.traces[int(i)] = t
            sessions = self.order.setdefault(t.namespace, [])
            if t.session not in sessions:
                sessions.append(t.session)

    def delete_session(self, ns, s):
        n = 0
        for i in [i for i, t in self.traces.items() if (t.namespace, t.session) == (ns, s)]:
            del self.traces[i]
            n += 1
        self.order[ns].remove(s)
        return n

    def delete_namespace(self, ns):
        n = sum(self.delete_session(ns, s) for s in list(self.order[ns]))
        del self.order[ns]
        return n

    def scope_sessions(self, ns, sessions=None, before=None):
        order = self.order[ns]
        if sessions is not None:
            return set(sessions)
        if before is not None:
            return set(order[: order.index(before)])
        return set(order)

    def search(self, q, attr, ns, k, sessions=None, before=None):
        allowed = self.scope_sessions(ns, sessions, before)
        cand = [(i, getattr(t, attr)) for i, t in self.traces.items()
                if t.namespace == ns and t.session in allowed and getattr(t, attr) is not None]
        if not cand:
            return np.zeros(0), np.zeros(0, np.int64)
        ids = np.array([c[0] for c in cand])
        scores = np.stack([c[1] for c in cand]).astype(np.float32) @ np.asarray(q, np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return scores[order], ids[order]


def random_traces(rng, n, namespaces=("a", "b"), sessions=3, dim=8, with_text_vec=True):
    out = []
    for j in range(n):
        ns = namespaces[rng.integers(len(namespaces))]
        out.append(Trace(
            namespace=ns, session=f"s{rng.integers(sessions)}", text=f"trace {j} word{j % 7}",
            step=j, latent_key=rng.normal(size=dim).astype(np.float32),
            latent_value=rng.normal(size=(2, 3)).astype(np.float32),
            text_embedding=rng.normal(size=32).astype(np.float32) if with_text_vec else None,
            meta={"j": j}))
    return out


def abandon(store) -> None:
    """Drop an open store the way a killed process does: LMDB keeps what was committed,
    nothing is flushed (saved indexes stay as old as they were), the writer lock goes."""
    import os

    from memory_store import layout

    store._closed = True
    layout.release_env(store._env)
    if store._lock_fd is not None:
        os.close(store._lock_fd)
