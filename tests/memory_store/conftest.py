"""Fixtures for the trace store tests: a fast deterministic embedder and store factories."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from memory_store import TraceStore


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


@pytest.fixture
def embedder():
    return HashEmbedder()


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def open_store(store_path, embedder):
    opened = []

    def make(**kw):
        kw.setdefault("embedder", embedder)
        s = TraceStore.open(kw.pop("path", store_path), **kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()
