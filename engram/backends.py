"""Memory backends behind one interface: ``write`` traces, ``retrieve`` candidates.

* ``TensorMemory``: tensors on the model's device, one memory per batch row (an episode, i.e.
  a namespace), differentiable end to end: used inside training episodes. Search is a batched
  matmul + top-k (no Python loop over rows or traces).
* ``StoreMemory`` (``engram.store_memory``): the persistent ``memory_store`` in latent space.

Both return ``Candidates``: for each batch row the traces any of its tokens retrieved, and for
each token which of them are in its own top-k. Scope: a reader in session ``s`` sees only
traces of sessions before ``s`` of its own namespace. Ranking score of trace m for query q:
``q·key_m + log σ(salience_m)`` — relevance plus the write gate's prior — computed as one
inner product of augmented vectors (``retrieval_key``/``retrieval_query``), so a vector
index ranks exactly as the tensor backend does.

Shapes: B rows, T query tokens, M candidate traces, S tokens per trace, D model dim, K key dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Candidates:
    key_BMK: torch.Tensor  # unit-length retrieval keys
    hidden_BMSD: torch.Tensor  # token-level trace values
    mask_BMS: torch.Tensor  # valid trace tokens
    tokens_BMS: torch.Tensor  # trace bytes (int64)
    salience_BM: torch.Tensor  # write-gate logits
    selected_BTM: torch.Tensor  # token t retrieved trace m (its top-k)
    ids_BM: torch.Tensor  # trace ids (-1 = padding)

    @property
    def n_traces(self) -> int:
        return self.key_BMK.shape[1]


def retrieval_key(key_NK: torch.Tensor, salience_N: torch.Tensor) -> torch.Tensor:
    """``[key, log σ(salience)]``: the vector a trace is indexed by."""
    prior = F.logsigmoid(salience_N.float()).to(key_NK.dtype)
    return torch.cat([key_NK, prior[..., None]], dim=-1)


def retrieval_query(q_TK: torch.Tensor) -> torch.Tensor:
    """``[q, 1]``: inner product with ``retrieval_key`` = relevance + salience prior."""
    return torch.cat([q_TK, torch.ones_like(q_TK[..., :1])], dim=-1)


def topk_selection(scores_BTM: torch.Tensor, eligible_BM: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the top-k eligible traces by score (ties: lower index first)."""
    B, T, M = scores_BTM.shape
    if M == 0:
        return torch.zeros(B, T, 0, dtype=torch.bool, device=scores_BTM.device)
    masked = scores_BTM.masked_fill(~eligible_BM[:, None, :], float("-inf"))
    k = min(k, M)
    idx = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :k]
    sel = torch.zeros(B, T, M, dtype=torch.bool, device=scores_BTM.device)
    sel.scatter_(-1, idx, True)
    return sel & eligible_BM[:, None, :]


class TensorMemory:
    """In-RAM (on-device) traces for a batch of episodes; gradients flow into keys, values and
    salience, so the write side is trained by what the reads need."""

    def __init__(self, batch_size: int, d_model: int, key_dim: int, trace_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.B, self.D, self.K, self.S = batch_size, d_model, key_dim, trace_len
        self.key_BMK = torch.zeros(batch_size, 0, key_dim, device=device, dtype=dtype)
        self.hidden_BMSD = torch.zeros(batch_size, 0, trace_len, d_model, device=device,
                                       dtype=dtype)
        self.mask_BMS = torch.zeros(batch_size, 0, trace_len, dtype=torch.bool, device=device)
        self.tokens_BMS = torch.zeros(batch_size, 0, trace_len, dtype=torch.long, device=device)
        self.salience_BM = torch.zeros(batch_size, 0, device=device, dtype=dtype)
        self.session_BM = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.valid_BM = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)

    @property
    def size(self) -> int:
        return self.key_BMK.shape[1]

    def write(self, key_BnK, hidden_BnSD, mask_BnS, tokens_BnS, salience_Bn, session: int,
              keep_Bn: torch.Tensor | None = None) -> None:
        """Append n traces per row from ``session``; ``keep_Bn`` marks which are written
        (others are stored as invalid slots so shapes stay rectangular)."""
        B, n = key_BnK.shape[:2]
        if B != self.B:
            raise ValueError(f"memory holds {self.B} rows, got {B}")
        if hidden_BnSD.shape[2] != self.S:
            raise ValueError(f"trace length {hidden_BnSD.shape[2]} != memory's {self.S}")
        keep = torch.ones(B, n, dtype=torch.bool, device=key_BnK.device) if keep_Bn is None \
            else keep_Bn.to(torch.bool)
        self.key_BMK = torch.cat([self.key_BMK, key_BnK.to(self.key_BMK.dtype)], 1)
        self.hidden_BMSD = torch.cat([self.hidden_BMSD, hidden_BnSD.to(self.hidden_BMSD.dtype)], 1)
        self.mask_BMS = torch.cat([self.mask_BMS, mask_BnS], 1)
        self.tokens_BMS = torch.cat([self.tokens_BMS, tokens_BnS.long()], 1)
        self.salience_BM = torch.cat([self.salience_BM, salience_Bn.to(self.salience_BM.dtype)], 1)
        self.session_BM = torch.cat(
            [self.session_BM, torch.full((B, n), session, device=key_BnK.device)], 1)
        self.valid_BM = torch.cat([self.valid_BM, keep], 1)

    def retrieve(self, query_BTK: torch.Tensor, session: int, k: int) -> Candidates:
        eligible = self.valid_BM & (self.session_BM < session)
        scores = torch.einsum("btk,bmk->btm", retrieval_query(query_BTK.float()),
                              retrieval_key(self.key_BMK.float(), self.salience_BM.float()))
        selected = topk_selection(scores, eligible, k)
        ids = torch.arange(self.size, device=query_BTK.device).expand(self.B, -1)
        ids = ids.masked_fill(~eligible, -1)
        return Candidates(self.key_BMK, self.hidden_BMSD, self.mask_BMS, self.tokens_BMS,
                          self.salience_BM, selected, ids)
