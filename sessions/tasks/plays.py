"""Cross-session language modelling on real text: each work of the Shakespeare corpus is a
namespace, its acts are sessions in order, and the measure is bits per byte of the context
(``score_context``): does reading the traces of earlier acts predict a later act better?

Sessions of a work: its acts (a heading line ``ACT I`` / ``Act 2.`` / ``ACT FIRST``; a
repeated heading of the same act does not start a new one); a work without act headings is
cut at its scene headings into ``n_parts`` groups of consecutive scenes, and a work with
neither (the poems) into ``n_parts`` parts at blank lines. The text before the first heading
(title, persons of the play) belongs to the first session. A session's text is packed line by
line into segments of at most ``segment_bytes`` bytes (a longer line is split).

The split of works is fixed (``HELD_OUT``, 7 plays): training episodes come from the other 35
works only, evaluation episodes from the held-out ones only (``tests/sessions/test_plays.py``
checks both). A model trained by this task has never seen a held-out work — unless you load
a checkpoint trained on the whole corpus (``engram train tiny`` reads 90% of every work).

Long works are subsampled: an episode takes, from every session, a window of ``window``
consecutive segments at an offset drawn from ``(split, seed, index)`` (``window: 0`` = the
whole session). Episodes are pure functions of (config, split, seed, index); evaluation
episode ``i`` is held-out work ``i % 7`` (window ``i // 7`` of it).

``byte_classifier`` labels every byte of a later session's context for the report "by
position": ``name`` inside a name that already occurred in an earlier session of the episode
(a capitalised word whose lower-case form never occurs in the episode: Hamlet, Ham., Denmark),
``phrase`` (elsewhere) where the 12 bytes ending at it occurred in an earlier session, and
``other``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from sessions.episodes import Episode, Session

# The fixed held-out works (never in training): seven plays with five marked acts each.
HELD_OUT = ("as_you_like_it", "hamlet", "julius_caesar", "macbeth", "midsummer_nights_dream",
            "othello", "twelfth_night")
_ORDINALS = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}
_ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5}
_ACT = re.compile(r"^\s*act\s+(first|second|third|fourth|fifth|[ivx]+|\d+)\.?\s*$", re.I)
_SCENE = re.compile(r"^\s*scene\s+([ivx]+|\d+)\b", re.I)
_WORD = re.compile(rb"[A-Za-z]+")
PHRASE_BYTES = 12


def _act_number(label: str) -> int:
    label = label.upper()
    return _ORDINALS.get(label) or _ROMAN.get(label) or (int(label) if label.isdigit() else 0)


def split_sessions(text: str, n_parts: int = 5) -> list[tuple[str, str]]:
    """(session id, text) of a work, in order: its acts, else groups of scenes, else parts."""
    lines = text.splitlines(keepends=True)
    acts, current = [], None
    for i, line in enumerate(lines):
        m = _ACT.match(line)
        if m and _act_number(m.group(1)) != current:
            current = _act_number(m.group(1))
            acts.append(i)
    if len(acts) >= 2:
        cuts, names = acts, [f"act{k + 1}" for k in range(len(acts))]
    else:
        scenes = [i for i, line in enumerate(lines) if _SCENE.match(line)]
        if len(scenes) >= n_parts:
            cuts = [scenes[(k * len(scenes)) // n_parts] for k in range(n_parts)]
        else:
            blank = [i for i, line in enumerate(lines) if not line.strip()] or [0]
            cuts = sorted({blank[(k * len(blank)) // n_parts] for k in range(n_parts)})
        names = [f"part{k + 1}" for k in range(len(cuts))]
    cuts = [0, *cuts[1:]]  # the text before the first heading opens the first session
    bounds = [*cuts, len(lines)]
    return [(names[k], "".join(lines[bounds[k]:bounds[k + 1]])) for k in range(len(cuts))]


def pack_segments(text: str, segment_bytes: int) -> list[str]:
    """Whole lines packed into segments of at most ``segment_bytes`` UTF-8 bytes."""
    out, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if cur and size + n > segment_bytes:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += n
    if cur:
        out.append("".join(cur))
    return [s for s in out if s.strip()]


def load_works(cache: str | Path) -> dict[str, str]:
    """Every work of the prepared corpus by name (``engram data prepare`` makes the folder)."""
    from sessions.data import prepare_shakespeare

    folder = prepare_shakespeare(Path(cache), quiet=True) / "works"
    works = {p.stem: p.read_text(encoding="utf-8", errors="replace")
             for p in sorted(folder.glob("*.txt"))}
    missing = sorted(set(HELD_OUT) - set(works))
    if missing:
        raise ValueError(f"{folder}: held-out work {missing[0]!r} is missing")
    return works


def train_works(names) -> list[str]:
    return sorted(n for n in names if n not in HELD_OUT)


@dataclass(frozen=True)
class PlaysTask:
    segment_bytes: int = 128  # at most the model's seq_len (longer segments are split)
    window: int = 8  # consecutive segments taken from every session (0: the whole session)
    max_sessions: int = 5
    n_parts: int = 5  # sessions of a work without act headings
    cache: str = "cache"  # the prepared corpus (engram data prepare)

    name = "plays"
    score_context = True  # the context's bits per byte are the measure
    _works: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        own = "PlaysTask"
        if self.segment_bytes < 16:
            raise ValueError(f"{own}.segment_bytes: at least 16")
        if self.window < 0:
            raise ValueError(f"{own}.window: must be >= 0 (0: whole sessions)")
        if self.max_sessions < 2 or self.n_parts < 2:
            raise ValueError(f"{own}.max_sessions / n_parts: at least 2 (memory needs an "
                             "earlier session)")

    def sessions_of(self, work: str) -> list[tuple[str, list[str]]]:
        """(session id, segments) of a work, memoised."""
        if work not in self._works:
            if "texts" not in self._works:
                self._works["texts"] = load_works(self.cache)
            text = self._works["texts"][work]
            self._works[work] = [(sid, pack_segments(t, self.segment_bytes))
                                 for sid, t in split_sessions(text, self.n_parts)
                                 ][:self.max_sessions]
        return self._works[work]

    def works(self, split: str) -> list[str]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be train or eval, got {split!r}")
        if split == "eval":
            return list(HELD_OUT)
        if "texts" not in self._works:
            self._works["texts"] = load_works(self.cache)
        return train_works(self._works["texts"])

    def count(self, split: str) -> int:
        return len(self.works(split))

    def episode(self, split: str, seed: int, index: int) -> Episode:
        works = self.works(split)
        rng = random.Random(f"plays:{split}:{seed}:{index}")
        work = works[index % len(works)] if split == "eval" else rng.choice(works)
        sessions = []
        for sid, segments in self.sessions_of(work):
            if self.window and len(segments) > self.window:
                start = rng.randrange(len(segments) - self.window + 1)
                segments = segments[start:start + self.window]
            sessions.append(Session(sid, tuple(segments)))
        suffix = f"-{index // len(works)}" if split == "eval" else f"-{seed}-{index}"
        return Episode(f"plays-{work.replace('_', '-')}{suffix}", tuple(sessions))

    validation_episodes = len(HELD_OUT)  # the training curve: one per held-out work

    def validation_episode(self, seed: int, index: int) -> Episode:
        """A held-out episode with the training window (the cheap curve while training)."""
        return replace(self, window=min(self.window or 6, 6)).episode("eval", seed, index)

    def byte_classifier(self, episode: Episode, s: int):
        """A function: text of session ``s`` -> one label per UTF-8 byte (module docstring)."""
        earlier = "".join("".join(x.context) for x in episode.sessions[:s]).encode("utf-8")
        everything = "".join("".join(x.context) for x in episode.sessions).encode("utf-8")
        lower = {w.group().lower() for w in _WORD.finditer(everything)
                 if w.group().islower()}
        names = {w.group() for w in _WORD.finditer(earlier)
                 if w.group()[:1].isupper() and w.group().lower() not in lower}
        grams = {earlier[i:i + PHRASE_BYTES] for i in range(len(earlier) - PHRASE_BYTES + 1)}

        def classify(text: str) -> list[str]:
            raw = text.encode("utf-8")
            labels = ["other"] * len(raw)
            for i in range(PHRASE_BYTES - 1, len(raw)):
                if raw[i - PHRASE_BYTES + 1:i + 1] in grams:
                    labels[i] = "phrase"
            for w in _WORD.finditer(raw):
                if w.group() in names:
                    labels[w.start():w.end()] = ["name"] * (w.end() - w.start())
            return labels

        return classify
