"""Typed errors of the trace store.

Every failure the store can diagnose is a subclass of :class:`StoreError` with a message that
says what was wrong and, where it helps, what to do. Validation happens before anything is
written, so a raised error means the store is unchanged.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by ``memory_store``."""


class InvalidInputError(StoreError, ValueError):
    """A trace, query or parameter is malformed (base of the input errors below).

    ``field`` names the offending field (``"external_id"``, ``"happened_at"``,
    ``"latent_key"``, ...) when one is to blame; the message starts with it too."""

    def __init__(self, message: str = "", field: str | None = None):
        super().__init__(message)
        self.field = field


class DimensionError(InvalidInputError):
    """A vector has the wrong dimension for its space."""


class NonFiniteError(InvalidInputError):
    """A vector contains NaN or infinity."""


class TextError(InvalidInputError):
    """A trace text is empty, not a string, or longer than the store allows."""


class TimeFormatError(InvalidInputError):
    """A time (``happened_at``, ``since``, ``until``) is not ISO 8601 nor epoch seconds."""


class InvalidNameError(InvalidInputError):
    """A namespace or session name is empty, too long, or has characters outside the allowed set."""


class UnknownNamespaceError(StoreError, KeyError):
    """The namespace has no traces in this store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnknownSessionError(StoreError, KeyError):
    """The session does not exist in the namespace."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownTraceError(StoreError, KeyError):
    """A trace id (internal, or external within a namespace) is not in the store."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotAStoreError(StoreError):
    """The path is not a trace store (missing, a file, or a directory without a store marker)."""


class ReadOnlyError(StoreError):
    """A write was attempted on a store opened read-only, or the directory is not writable."""


class FormatVersionError(StoreError):
    """The store was written by a newer format version than this code understands."""


class WriterLockedError(StoreError):
    """Another process holds the writer lock of this store."""


class CorruptStoreError(StoreError):
    """The LMDB data itself is inconsistent (the index is a cache and is rebuilt instead)."""
