"""memory_store: a FAISS-indexed LMDB store of traces keyed by namespace and session.

Part of "Engram on mHC". Here "Engram" is persistent trace memory (not DeepSeek's hashed
N-gram table) and "mHC" is Mixture-of-Hierarchical-Components (not DeepSeek's
Manifold-Constrained Hyper-Connections). This package never imports model code.

    from memory_store import TraceStore, Trace, Scope
    with TraceStore.open("runs/store", latent_dim=64) as store:
        ids = store.add([Trace("user1", "s1", "text", latent_key=k, latent_value=v)])
        scores, ids = store.search_latent(queries, Scope("user1", before="s2"), k=8)
        hits = store.search("what did I say about X?", "user1")   # hybrid text search
        # idempotent writes and time: re-adding an external id replaces that trace
        store.add([Trace("user1", "s1", "moved to Lisbon", external_id="s1/0",
                         happened_at="2024-03-01")])
        hits = store.search("where do I live?", Scope("user1", since="2024-01-01",
                                                      hide_superseded=True))
        store.delete(["s1/0"], namespace="user1"); store.compact()

Idempotent writes: give each trace a stable ``external_id`` (any string of at most 256
UTF-8 bytes, unique in its namespace; a session runner can use ``f"{session}/{segment}"``)
and, when known, ``happened_at`` (ISO 8601 or epoch seconds). Adding a trace whose external
id the namespace already holds replaces it (same internal id, ``version`` + 1), so re-running
a session leaves the store as one run would. ``store.resolve(ns, external_ids)`` gives the
internal ids; ``store.delete(ids_or_external_ids, namespace=ns)`` forgets them.

Modules: ``errors`` (typed errors), ``records`` (Trace + validation), ``codec`` (record
bytes), ``timefmt`` (ISO 8601 times), ``layout`` (LMDB layout), ``changes`` (change log),
``index`` / ``ann`` / ``index_io`` (exact and FAISS scoped vector index, its files),
``lexical`` (BM25), ``documents`` (indexed text, fusion), ``embedder`` (offline MiniLM),
``scope`` (Scope, Hit), ``store`` / ``writes`` / ``forget`` / ``search`` / ``maintenance`` /
``transfer`` (TraceStore), ``cli`` (``python -m memory_store``, ``engram traces``).
"""

from .documents import TextConfig
from .errors import (
                     CorruptStoreError,
                     DimensionError,
                     FormatVersionError,
                     InvalidInputError,
                     InvalidNameError,
                     NonFiniteError,
                     NotAStoreError,
                     ReadOnlyError,
                     StoreError,
                     TextError,
                     TimeFormatError,
                     UnknownNamespaceError,
                     UnknownSessionError,
                     UnknownTraceError,
                     WriterLockedError,
)
from .index import IndexConfig
from .maintenance import VerifyReport
from .records import Trace
from .scope import Hit, Scope, SessionInfo
from .store import TraceStore

__all__ = [
    "TraceStore", "Trace", "Scope", "Hit", "SessionInfo", "IndexConfig", "TextConfig",
    "VerifyReport", "StoreError", "InvalidInputError", "DimensionError", "NonFiniteError",
    "TextError", "TimeFormatError", "InvalidNameError", "UnknownNamespaceError",
    "UnknownSessionError", "UnknownTraceError", "NotAStoreError", "ReadOnlyError",
    "FormatVersionError", "WriterLockedError", "CorruptStoreError",
]
