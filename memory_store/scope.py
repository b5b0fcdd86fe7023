"""Search scopes and results.

A :class:`Scope` names one namespace and optionally restricts it to a list of sessions or to
the sessions written before a given one (sessions are ordered by their first write within the
namespace), to a time window (``since`` / ``until`` on ``time_field``: ``happened_at``, the
default, or ``recorded_at``; both ends inclusive; traces without a ``happened_at`` never pass
a ``happened_at`` window), and can hide traces that a later trace supersedes. Every search
takes a scope; nothing outside it is ever scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError
from .records import check_name
from .timefmt import iso, parse_time

TIME_FIELDS = ("happened_at", "recorded_at")


@dataclass(frozen=True)
class Scope:
    namespace: str
    sessions: tuple[str, ...] | None = None
    before: str | None = None
    since: Any = None
    until: Any = None
    time_field: str = "happened_at"
    hide_superseded: bool = False

    def __post_init__(self):
        check_name("namespace", self.namespace)
        if self.sessions is not None:
            if isinstance(self.sessions, str):
                object.__setattr__(self, "sessions", (self.sessions,))
            object.__setattr__(self, "sessions", tuple(self.sessions))
            for s in self.sessions:
                check_name("session", s)
        if self.before is not None:
            check_name("session", self.before)
            if self.sessions is not None:
                raise InvalidInputError("sessions and before: give at most one of them",
                                        "before")
        if self.time_field not in TIME_FIELDS:
            raise InvalidInputError(f"time_field: must be one of {TIME_FIELDS}, got "
                                    f"{self.time_field!r}", "time_field")
        since, until = parse_time(self.since, "since"), parse_time(self.until, "until")
        if since is not None and until is not None and since > until:
            raise InvalidInputError(f"since: {iso(since)} is after until {iso(until)}", "since")
        object.__setattr__(self, "since", since)
        object.__setattr__(self, "until", until)
        object.__setattr__(self, "hide_superseded", bool(self.hide_superseded))

    @classmethod
    def of(cls, scope: Scope | str | dict) -> Scope:
        """Accept a Scope, a bare namespace name, or a dict with the same fields."""
        if isinstance(scope, Scope):
            return scope
        if isinstance(scope, str):
            return cls(scope)
        if isinstance(scope, dict):
            unknown = set(scope) - set(cls.__dataclass_fields__)
            if unknown:
                raise InvalidInputError(f"scope: unknown fields {sorted(unknown)}", "scope")
            return cls(**scope)
        raise TypeError(f"scope: expected Scope, str or dict, got {type(scope).__name__}")

    @property
    def filtered(self) -> bool:
        """Whether anything beyond the sessions narrows the scope."""
        return self.since is not None or self.until is not None or self.hide_superseded


@dataclass
class Hit:
    """One search result (``score``: higher is better; its scale depends on space and mode)."""

    trace_id: int
    score: float
    namespace: str
    session: str
    step: int
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    external_id: str | None = None
    happened_at: float | None = None
    recorded_at: float | None = None
    version: int = 1

    def to_json(self) -> dict[str, Any]:
        """The CLI's result object: trace_id, external_id, session, text, score, happened_at."""
        return {"trace_id": self.trace_id, "external_id": self.external_id,
                "session": self.session, "text": self.text, "score": self.score,
                "happened_at": iso(self.happened_at)}


@dataclass
class SessionInfo:
    namespace: str
    session: str
    ordinal: int
    count: int
    first_write: float
