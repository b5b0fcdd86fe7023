"""Search scopes and results.

A :class:`Scope` names one namespace and optionally restricts it to a list of sessions or to
the sessions written before a given one (sessions are ordered by their first write within the
namespace). Every search takes a scope; nothing outside it is ever scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .records import check_name


@dataclass(frozen=True)
class Scope:
    namespace: str
    sessions: tuple[str, ...] | None = None
    before: str | None = None

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
                raise ValueError("sessions and before: give at most one of them")

    @classmethod
    def of(cls, scope: Scope | str | dict) -> Scope:
        """Accept a Scope, a bare namespace name, or a dict with the same fields."""
        if isinstance(scope, Scope):
            return scope
        if isinstance(scope, str):
            return cls(scope)
        if isinstance(scope, dict):
            return cls(scope["namespace"], scope.get("sessions"), scope.get("before"))
        raise TypeError(f"scope: expected Scope, str or dict, got {type(scope).__name__}")


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

    def to_json(self) -> dict[str, Any]:
        """The CLI's result object: trace_id, session, text, score."""
        return {"trace_id": self.trace_id, "session": self.session, "text": self.text,
                "score": self.score}


@dataclass
class SessionInfo:
    namespace: str
    session: str
    ordinal: int
    count: int
    first_write: float
