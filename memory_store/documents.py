"""How a trace becomes the text document that the text space indexes (dense and lexical).

A trace's *document* is its own text written as ``"<speaker>: <text>"`` when the meta has
``speaker_field``, prefixed by the values of ``prefix_fields`` from its meta (e.g. the time).
The dense embedding is computed from the document alone. The lexical (BM25) index also sees
the lines of up to ``context_turns`` earlier traces of the same session, with their term
frequencies weighted by ``context_weight`` (a BM25F-style field weight): a turn that answers a
question often shares few words with it while its neighbours do. Context is causal (only
traces written before), so nothing indexed ever depends on later writes; the context ids are
recorded with the trace so the lexical index is rebuilt identically from LMDB.

Hybrid search fuses the dense and lexical rankings by weighted reciprocal-rank fusion:
``score = sum_r w_r / (rrf_k + rank_r)``.

This is the store's default text behaviour for every caller (CLI, Engram, benchmarks);
``TextConfig(context_turns=0, prefix_fields=(), speaker_field=None)`` indexes bare text.
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
    prefix_fields: tuple[str, ...] = ("time",)
    speaker_field: str | None = "speaker"
    default_mode: str = "hybrid"
    rrf_k: int = 60
    dense_weight: float = 1.0
    lexical_weight: float = 2.0
    fusion_depth: int = 100
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    max_text_chars: int = 16_384

    def __post_init__(self):
        self.prefix_fields = tuple(self.prefix_fields)
        if self.context_turns < 0:
            raise ValueError("context_turns: must be >= 0")
        if self.default_mode not in MODES:
            raise ValueError(f"default_mode: must be one of {MODES}, got {self.default_mode!r}")
        for name in ("context_weight", "dense_weight", "lexical_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0")
        if self.rrf_k < 1:
            raise ValueError("rrf_k: must be >= 1")
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


def document(text: str, meta: dict[str, Any], cfg: TextConfig) -> str:
    """The indexed document of a trace (embedded for dense search)."""
    prefix = " ".join(str(meta[f]) for f in cfg.prefix_fields if meta.get(f) not in (None, ""))
    body = line(text, meta, cfg)
    return f"{prefix} {body}" if prefix else body


def context_text(context: list[tuple[str, dict[str, Any]]], cfg: TextConfig) -> str:
    """The lexical context field: earlier same-session lines, oldest first."""
    return " ".join(line(t, m, cfg) for t, m in context)
