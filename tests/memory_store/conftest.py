"""Fixtures for the trace store tests: a fast deterministic embedder and store factories."""

from __future__ import annotations

import pytest
from store_testlib import HashEmbedder

from memory_store import TraceStore


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
