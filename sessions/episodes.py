"""The experiment protocol: an ``Episode`` is a namespace with an ordered list of ``Session``s;
a session holds context segments (the model reads memory while encoding them, then the write
policy may persist traces of them) and ``Probe``s (a prompt and the answer span that is
scored: exact match and answer bits per byte). Every session reads the traces of the
episode's earlier sessions and writes its own, so memory accumulates over the episode.

Episodes of your own come as JSON lines, one episode a line::

    {"namespace": "alice", "sessions": [
        {"id": "s1", "context": ["my locker code is 4829."], "probes": []},
        {"id": "s2", "date": "2024-05-01", "context": [],
         "probes": [{"prompt": "alice's locker code is ", "answer": "4829",
                     "evidence": ["s1/0"], "tags": {"kind": "fact"}}]}]}

``date`` (ISO 8601), ``evidence`` (the context segments that answer a probe, as
``"<session id>/<segment index>"``: the external ids the runner gives traces) and ``tags``
(free-form labels reports group by) are optional.

A session may also ask the model to *generate* (``"generate": [{"prompt", "reference",
"answer", "max_bytes", "stop"}]``): the runner decodes greedily from each prompt (reading
memory like the rest of the session) until the stop string or ``max_bytes``, and ``prompt +
generation`` becomes the session's next context segment — after its ``context``, so its id
is ``"<session>/<len(context) + i>"`` — which the write policy may persist. Training uses
``prompt + reference + stop`` as that segment instead (``with_references``). ``answer`` is
the suffix a correct generation ends with (reports count how often it does).

``read_episodes`` checks the whole file
before anything runs and raises ``EpisodeFileError`` naming the line and the field.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


class EpisodeFileError(ValueError):
    """An episodes file (or an episode built in code) is malformed: says where and which field."""


@dataclass(frozen=True)
class Probe:
    prompt: str
    answer: str
    evidence: tuple[str, ...] = ()  # external ids of the context segments that answer it
    tags: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Generate:
    """A prompt the runner decodes from greedily; ``prompt + generation`` becomes a context
    segment (training uses ``prompt + reference + stop``)."""

    prompt: str
    reference: str  # the worked solution training teaches
    answer: str = ""  # the suffix a correct generation ends with ("" = no check)
    max_bytes: int = 128
    stop: str = "\n"

    def training_text(self) -> str:
        return self.prompt + self.reference + self.stop


@dataclass(frozen=True)
class Session:
    id: str
    context: tuple[str, ...] = ()
    probes: tuple[Probe, ...] = ()
    date: str | None = None  # when the session happened (ISO 8601), if known
    generate: tuple[Generate, ...] = ()  # prompts to generate from (segments after context)

    @property
    def n_segments(self) -> int:
        """Context segments once the generations are added."""
        return len(self.context) + len(self.generate)


def with_references(episode: Episode) -> Episode:
    """The episode as training sees it: every generation replaced by its reference."""
    if not any(s.generate for s in episode.sessions):
        return episode
    return replace(episode, sessions=tuple(
        replace(s, context=s.context + tuple(g.training_text() for g in s.generate),
                generate=()) for s in episode.sessions))


@dataclass(frozen=True)
class Episode:
    namespace: str
    sessions: tuple[Session, ...]

    def to_json(self) -> dict:
        out = {"namespace": self.namespace, "sessions": []}
        for s in self.sessions:
            sess: dict[str, Any] = {"id": s.id, "context": list(s.context), "probes": []}
            if s.date is not None:
                sess["date"] = s.date
            if s.generate:
                sess["generate"] = [{"prompt": g.prompt, "reference": g.reference,
                                     "answer": g.answer, "max_bytes": g.max_bytes,
                                     "stop": g.stop} for g in s.generate]
            for p in s.probes:
                probe: dict[str, Any] = {"prompt": p.prompt, "answer": p.answer}
                if p.evidence:
                    probe["evidence"] = list(p.evidence)
                if p.tags:
                    probe["tags"] = dict(p.tags)
                sess["probes"].append(probe)
            out["sessions"].append(sess)
        return out


def segment_id(session_id: str, index: int) -> str:
    """The external id of context segment ``index`` of a session (what evidence names)."""
    return f"{session_id}/{index}"


# ---- parsing and validation ------------------------------------------------------------
def _fail(where: str, path: str, message: str):
    raise EpisodeFileError(f"{where}: {path}: {message}")


def _keys(obj: Any, where: str, path: str, required: set[str], optional: set[str]) -> dict:
    if not isinstance(obj, dict):
        _fail(where, path, f"expected an object, got {type(obj).__name__}")
    missing = sorted(required - set(obj))
    if missing:
        _fail(where, f"{path}.{missing[0]}" if path else missing[0], "missing")
    unknown = sorted(set(obj) - required - optional)
    if unknown:
        _fail(where, f"{path}.{unknown[0]}" if path else unknown[0],
              f"unknown field (known: {sorted(required | optional)})")
    return obj


def _text(value: Any, where: str, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(where, path, f"expected a non-empty string, got {value!r}")
    return value


def _name(kind: str, value: Any, where: str, path: str) -> str:
    # the store's own name rule; imported here so training never needs faiss/lmdb
    from memory_store.errors import InvalidNameError
    from memory_store.records import check_name

    try:
        return check_name(kind, value)
    except InvalidNameError as err:
        _fail(where, path, str(err))


def _date(value: Any, where: str, path: str) -> str:
    if not isinstance(value, str):
        _fail(where, path, f"expected an ISO 8601 date string, got {value!r}")
    try:
        datetime.datetime.fromisoformat(value)
    except ValueError:
        _fail(where, path, f"not an ISO 8601 date or time: {value!r}")
    return value


def episode_from_json(obj: Any, where: str = "episode") -> Episode:
    """Build and validate one episode from its JSON object; ``where`` prefixes errors."""
    _keys(obj, where, "", {"namespace", "sessions"}, set())
    namespace = _name("namespace", obj["namespace"], where, "namespace")
    raw_sessions = obj["sessions"]
    if not isinstance(raw_sessions, list) or not raw_sessions:
        _fail(where, "sessions", "expected a non-empty list of sessions")
    sessions, seen = [], set()
    for i, s in enumerate(raw_sessions):
        p = f"sessions[{i}]"
        _keys(s, where, p, {"id", "context", "probes"}, {"date", "generate"})
        sid = _name("session", s["id"], where, f"{p}.id")
        if sid in seen:
            _fail(where, f"{p}.id", f"session id {sid!r} appears twice in this episode")
        seen.add(sid)
        if not isinstance(s["context"], list):
            _fail(where, f"{p}.context", "expected a list of strings")
        context = tuple(_text(c, where, f"{p}.context[{j}]") for j, c in enumerate(s["context"]))
        if not isinstance(s["probes"], list):
            _fail(where, f"{p}.probes", "expected a list of probes")
        probes = []
        for j, q in enumerate(s["probes"]):
            pq = f"{p}.probes[{j}]"
            _keys(q, where, pq, {"prompt", "answer"}, {"evidence", "tags"})
            evidence = q.get("evidence", [])
            if not isinstance(evidence, list) or not all(isinstance(e, str) for e in evidence):
                _fail(where, f"{pq}.evidence", "expected a list of '<session>/<segment>' strings")
            tags = q.get("tags", {})
            if not isinstance(tags, dict):
                _fail(where, f"{pq}.tags", "expected an object")
            probes.append(Probe(_text(q["prompt"], where, f"{pq}.prompt"),
                                _text(q["answer"], where, f"{pq}.answer"), tuple(evidence), tags))
        date = _date(s["date"], where, f"{p}.date") if s.get("date") is not None else None
        sessions.append(Session(sid, context, tuple(probes), date,
                                _generate(s.get("generate", []), where, f"{p}.generate")))
    _check_evidence(sessions, where)
    return Episode(namespace, tuple(sessions))


def _generate(raw: Any, where: str, path: str) -> tuple[Generate, ...]:
    if not isinstance(raw, list):
        _fail(where, path, "expected a list of {prompt, reference, ...} objects")
    out = []
    for j, g in enumerate(raw):
        pg = f"{path}[{j}]"
        _keys(g, where, pg, {"prompt", "reference"}, {"answer", "max_bytes", "stop"})
        max_bytes = g.get("max_bytes", 128)
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
            _fail(where, f"{pg}.max_bytes", f"expected a positive integer, got {max_bytes!r}")
        for key in ("answer", "stop"):
            if not isinstance(g.get(key, ""), str):
                _fail(where, f"{pg}.{key}", "expected a string")
        out.append(Generate(_text(g["prompt"], where, f"{pg}.prompt"),
                            _text(g["reference"], where, f"{pg}.reference"),
                            g.get("answer", ""), max_bytes, g.get("stop", "\n")))
    return tuple(out)


def _check_evidence(sessions: list[Session], where: str) -> None:
    """Evidence must name a context segment of an earlier session (what a probe can read)."""
    earlier: set[str] = set()
    for i, s in enumerate(sessions):
        for j, p in enumerate(s.probes):
            for k, e in enumerate(p.evidence):
                if e not in earlier:
                    _fail(where, f"sessions[{i}].probes[{j}].evidence[{k}]",
                          f"{e!r} is not a context segment of an earlier session "
                          "('<session id>/<segment index>')")
        earlier.update(segment_id(s.id, j) for j in range(s.n_segments))


def read_episodes(path: str | Path) -> list[Episode]:
    """All episodes of a JSONL file, validated as a whole (blank lines are skipped):
    a bad line, a bad field or a namespace used twice raises ``EpisodeFileError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"episodes file {path} does not exist")
    episodes, lines_of = [], {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise EpisodeFileError(f"{where}: not valid JSON ({err.msg} at column "
                                       f"{err.colno})") from None
            ep = episode_from_json(obj, where)
            if ep.namespace in lines_of:
                _fail(where, "namespace", f"{ep.namespace!r} is already used on line "
                      f"{lines_of[ep.namespace]}: one episode per namespace")
            lines_of[ep.namespace] = n
            episodes.append(ep)
    if not episodes:
        raise EpisodeFileError(f"{path}: no episodes (the file is empty)")
    return episodes


def write_episodes(path: str | Path, episodes: Iterable[Episode]) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for ep in episodes:
            f.write(json.dumps(ep.to_json(), ensure_ascii=False) + "\n")
    return path
