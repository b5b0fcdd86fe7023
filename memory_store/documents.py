"""How a trace becomes the text that the text space indexes (dense and lexical), and how
hybrid search fuses the two rankings.

* A trace's *line* is ``"<speaker>: <text>"`` when its meta has ``speaker_field``, else its
  text.
* **Dense**: the embedding is computed, once at write time, from the lines of the previous
  ``dense_context_turns`` traces of the same session followed by its own line (a reply is
  embedded with what it replies to). Only earlier traces count, so an embedding never depends
  on later writes and is never recomputed.
* **Lexical** (BM25, ``lexical.py``): the document is the values of ``prefix_fields`` from
  the meta (e.g. the session time) followed by the line; two context fields add the previous
  ``context_turns`` lines and the next ``next_turns`` lines of the same session with term
  frequencies weighted ``context_weight`` / ``next_weight`` (BM25F style): a turn that answers
  a question often shares few words with it while its neighbours do. The lexical index is an
  in-memory cache rebuilt from LMDB, so its documents follow later writes; the previous-turn
  ids are recorded with each trace, so it is rebuilt identically.
* **Hybrid** (the default mode): the dense and lexical top-``fusion_depth`` lists are fused by
  normalised score: ``lexical_weight * bm25 / max(bm25) + dense_weight * (cos - min) / (max -
  min)``, and when the query names exactly one speaker of the namespace (a value of the
  ``speaker_field`` meta, as a whole word), that speaker's traces get ``speaker_boost`` more.

This is the store's default text behaviour for every caller (CLI, Engram, benchmarks); the
defaults were chosen as global settings on the LoCoMo dev conversations (``docs/store.md``).
``TextConfig(context_turns=0, next_turns=0, dense_context_turns=0, prefix_fields=(),
speaker_field=None, speaker_boost=0)`` indexes bare text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODES = ("dense", "lexical", "hybrid")


@dataclass
class TextConfig:
    """Text-space settings of a store (persisted at creation)."""

    context_turns: int = 2
    context_weight: float = 0.5
    next_turns: int = 1
    next_weight: float = 0.3
    dense_context_turns: int = 1
    prefix_fields: tuple[str, ...] = ("time",)
    speaker_field: str | None = "speaker"
    default_mode: str = "hybrid"
    dense_weight: float = 0.5
    lexical_weight: float = 1.0
    speaker_boost: float = 0.2
    fusion_depth: int = 100
    bm25_k1: float = 0.9
    bm25_b: float = 0.4
    max_text_chars: int = 16_384

    def __post_init__(self):
        self.prefix_fields = tuple(self.prefix_fields)
        for name in ("context_turns", "next_turns", "dense_context_turns"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.default_mode not in MODES:
            raise ValueError(f"default_mode: must be one of {MODES}, got {self.default_mode!r}")
        for name in ("context_weight", "next_weight", "dense_weight", "lexical_weight",
                     "speaker_boost"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.fusion_depth < 1:
            raise ValueError("fusion_depth: must be >= 1")
        if self.bm25_k1 <= 0:
            raise ValueError("bm25_k1: must be > 0")
        if not 0 <= self.bm25_b <= 1:
            raise ValueError("bm25_b: must be in [0, 1]")
        if self.max_text_chars < 1:
            raise ValueError("max_text_chars: must be >= 1")


def line(text: str, meta: dict[str, Any], cfg: TextConfig) -> str:
    speaker = meta.get(cfg.speaker_field) if cfg.speaker_field else None
    return f"{speaker}: {text}" if speaker not in (None, "") else text


def speaker_of(meta: dict[str, Any], cfg: TextConfig) -> str | None:
    speaker = meta.get(cfg.speaker_field) if cfg.speaker_field else None
    return speaker if isinstance(speaker, str) and speaker.strip() else None


def dense_document(text: str, meta: dict[str, Any], before: list[tuple[str, dict[str, Any]]],
                   cfg: TextConfig) -> str:
    """The text embedded for dense search: earlier same-session lines, then this line."""
    return " ".join([line(t, m, cfg) for t, m in before] + [line(text, meta, cfg)])


def lexical_document(text: str, meta: dict[str, Any], cfg: TextConfig) -> str:
    """The BM25 document of a trace (its context fields come from ``context_text``)."""
    prefix = " ".join(str(meta[f]) for f in cfg.prefix_fields if meta.get(f) not in (None, ""))
    body = line(text, meta, cfg)
    return f"{prefix} {body}" if prefix else body


def context_text(context: list[tuple[str, dict[str, Any]]], cfg: TextConfig) -> str:
    """A lexical context field: same-session lines, in session order."""
    return " ".join(line(t, m, cfg) for t, m in context)
