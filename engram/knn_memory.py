"""``KNNMemory``: the Memorizing-Transformers-style anchor behind the same ``MemoryBackend``
protocol — every token of every earlier segment is kept (no write policy, no trace-length
cap, no compression) and every query token attends over all of them.

Memorizing Transformers (Wu et al., 2022) cache the (key, value) of every token of earlier
context and let each query attend over its approximate top-k nearest keys. Here the same
Engram reader reads it: ``retrieve`` hands every eligible trace to every query token, so the
reader's token attention (cosine keys, learned temperature, null slot) is *exact* attention
over every stored token — the limit that kNN top-k approximates. What Engram's learned,
budgeted writes save against this anchor is measured side by side: bits per byte and
``footprint_bytes`` (what a memory holds: per stored token its hidden state and byte, per
trace its key and salience).

Traces come from ``encode_all_tokens``: the model's own write pass (backbone up to the memory
layer, the writer's key and salience) with the value holding *all* the segment's tokens, not
the last ``max_trace_tokens``.
"""

from __future__ import annotations

import torch

from engram.backends import Candidates, TensorMemory, TraceBatch
from engram.write import WrittenTraces, right_align


def encode_all_tokens(model, idx_NS: torch.Tensor, mask_NS: torch.Tensor) -> WrittenTraces:
    """``model.encode_traces`` without the trace-length cap (no autograd)."""
    with torch.no_grad():
        hidden = model.backbone(idx_NS, stop_after_layer=model.write_layer).hidden
        tr = model.writer(hidden, mask_NS, idx_NS)
        full, mask, tokens = right_align(hidden, mask_NS, idx_NS, idx_NS.shape[1])
    return WrittenTraces(tr.key_NK, full, mask, tr.salience_N, tokens)


class KNNMemory(TensorMemory):
    """Every segment written in full; every eligible trace retrieved by every query token."""

    def write(self, batch: TraceBatch, session: int | torch.Tensor,
              keep_Bn: torch.Tensor | None = None) -> None:
        super().write(batch, session, keep_Bn=None)  # no write policy: everything is kept

    def retrieve(self, query_BTK: torch.Tensor, session: int | torch.Tensor, k: int) -> Candidates:
        return super().retrieve(query_BTK, session, max(self.size, 1))  # k = all


def footprint_bytes(n_tokens: int, n_traces: int, d_model: int, key_dim: int,
                    bytes_per_value: int = 4) -> int:
    """Bytes a latent memory holds: per stored token its hidden state (``d_model`` floats)
    and its byte; per trace its retrieval key (``key_dim`` + 1 floats) and salience."""
    return (n_tokens * (d_model * bytes_per_value + 1)
            + n_traces * ((key_dim + 2) * bytes_per_value))
