"""Memory backends behind one protocol (``MemoryBackend``): ``write`` a session's traces,
``retrieve`` candidates for queries, ``rows`` (a view for several queries per episode),
``describe`` retrieved traces, ``clear``.

* ``TensorMemory``: tensors on the model's device, one memory per batch row (an episode, i.e.
  a namespace), differentiable end to end: used inside training episodes. Search is a batched
  matmul + top-k (no Python loop over rows or traces, no host synchronisation).
* ``StoreMemory`` (``engram.store_memory``): the persistent ``memory_store`` in latent space.

The runner and the trainer hold a ``MemoryBackend`` and never ask which one it is.

Both return ``Candidates``: for each batch row the traces any of its tokens retrieved, and for
each token which of them are in its own top-k. Scope: a reader in session ``s`` sees only
traces of sessions before ``s`` of its own namespace. Ranking score of trace m for query q:
``q·key_m + log σ(salience_m)`` — relevance plus the write gate's prior — computed as one
inner product of augmented vectors (``retrieval_key``/``retrieval_query``), so a vector
index ranks exactly as the tensor backend does. A backend made with ``salience_prior=False``
(``EngramConfig.salience_in_read`` false) indexes a zero prior: relevance alone. ``age_BM``
(reader's session − trace's session, ≥ 1 for every eligible trace) lets the reader prefer newer
traces (facts updated in a later session).

Shapes: B rows, T query tokens, M candidate traces, S tokens per trace, D model dim, K key dim,
n traces written per row by one ``write``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
    ids_BM: torch.Tensor  # backend trace ids (-1 = padding)
    age_BM: torch.Tensor  # sessions between the reader and the trace (float, >= 1 if eligible)
    scores_BTM: torch.Tensor  # retrieval score of trace m for token t (-inf if not selected)
    # query row b reads memory row row_index[b] of the trace contents (hidden, mask, tokens,
    # salience), so a reader projects each episode's traces once however many of its probes
    # read them; None: the same rows
    row_index: torch.Tensor | None = None

    @property
    def n_traces(self) -> int:
        return self.key_BMK.shape[1]


@dataclass
class TraceBatch:
    """n traces per row, made by ``EngramModel.encode_traces`` from one session's segments.
    ``texts`` (the segments' text) and ``external_ids`` (stable ids such as
    ``"s2/3"``: session s2, segment 3, so a re-run session overwrites instead of duplicating)
    are what a persistent backend stores beside the tensors."""

    key_BnK: torch.Tensor
    hidden_BnSD: torch.Tensor
    mask_BnS: torch.Tensor
    tokens_BnS: torch.Tensor
    salience_Bn: torch.Tensor
    texts: list[list[str]] | None = None
    external_ids: list[list[str]] | None = None
    happened_at: list[str | None] | None = None  # per row (the session's date), if known

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.key_BnK.shape[:2])


@runtime_checkable
class MemoryBackend(Protocol):
    """What the model, the trainer and the runner need of a memory."""

    @property
    def B(self) -> int: ...

    def write(self, batch: TraceBatch, session: int, keep_Bn: torch.Tensor | None = None
              ) -> None: ...  # session: the index of the session in the episode

    def retrieve(self, query_BTK: torch.Tensor, session: int | torch.Tensor, k: int
                 ) -> Candidates: ...

    def rows(self, index: list[int]) -> MemoryBackend: ...

    def describe(self, row: int, ids: list[int]) -> list[dict]: ...

    def clear(self) -> None: ...


def retrieval_key(key_NK: torch.Tensor, salience_N: torch.Tensor | None) -> torch.Tensor:
    """``[key, log σ(salience)]``: the vector a trace is indexed by (``salience_N`` None:
    ``[key, 0]``, no prior)."""
    prior = key_NK.new_zeros(key_NK.shape[:-1]) if salience_N is None else \
        F.logsigmoid(salience_N.float()).to(key_NK.dtype)
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


def session_tensor(session: int | torch.Tensor, B: int, device) -> torch.Tensor:
    """The reader's session per row, ``(B,)`` int64."""
    if torch.is_tensor(session):
        if session.shape != (B,):
            raise ValueError(f"session must be an int or a ({B},) tensor, got "
                             f"{tuple(session.shape)}")
        return session.to(device=device, dtype=torch.long)
    return torch.full((B,), int(session), dtype=torch.long, device=device)


class TensorMemory:
    """On-device traces for a batch of episodes; gradients flow into keys, values and
    salience, so the write side is trained by what the reads need.

    ``namespaces`` / ``session_names`` (optional) name rows and session indices for
    ``describe``; ``external_ids`` of written traces are kept per row. ``salience_prior``:
    whether the gate's logit enters the ranking (see the module doc)."""

    def __init__(self, batch_size: int, d_model: int, key_dim: int, trace_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 namespaces: list[str] | None = None,
                 session_names: list[list[str]] | None = None, salience_prior: bool = True):
        self._B, self.D, self.K, self.S = batch_size, d_model, key_dim, trace_len
        self.device, self.dtype = torch.device(device), dtype
        self.namespaces = namespaces  # None in training: no names, nothing kept on the host
        self.session_names = session_names  # per row: the episode's session ids
        self.salience_prior = salience_prior
        self.read_scope = "earlier"  # or "previous": only the session just before
        self.clear()

    @property
    def B(self) -> int:
        return self._B

    @property
    def size(self) -> int:  # slots, written or not
        return self.key_BMK.shape[1]

    def clear(self) -> None:
        self._index = None  # a view's rows (see rows())
        B, dev, dt = self._B, self.device, self.dtype
        self.key_BMK = torch.zeros(B, 0, self.K, device=dev, dtype=dt)
        self.hidden_BMSD = torch.zeros(B, 0, self.S, self.D, device=dev, dtype=dt)
        self.mask_BMS = torch.zeros(B, 0, self.S, dtype=torch.bool, device=dev)
        self.tokens_BMS = torch.zeros(B, 0, self.S, dtype=torch.long, device=dev)
        self.salience_BM = torch.zeros(B, 0, device=dev, dtype=dt)
        self.session_BM = torch.zeros(B, 0, dtype=torch.long, device=dev)
        self.valid_BM = torch.zeros(B, 0, dtype=torch.bool, device=dev)
        self.external_ids: list[list[str | None]] = [[] for _ in range(B)]

    def write(self, batch: TraceBatch, session: int | torch.Tensor,
              keep_Bn: torch.Tensor | None = None) -> None:
        """Append n traces per row from ``session`` (or a ``(B, n)`` tensor of sessions:
        training writes every session of an episode at once); ``keep_Bn`` marks which are
        written (the others are stored as invalid slots so shapes stay rectangular)."""
        B, n = batch.shape
        if self._index is not None:
            raise ValueError("TensorMemory.write: write to the memory, not to a rows() view")
        if B != self._B:
            raise ValueError(f"memory holds {self._B} rows, got {B}")
        width = batch.hidden_BnSD.shape[2]
        if width > self.S:
            raise ValueError(f"trace length {width} > the memory's {self.S}")
        if width < self.S:  # traces are right-aligned: pad on the left with invalid tokens
            pad = self.S - width
            batch = TraceBatch(batch.key_BnK, F.pad(batch.hidden_BnSD, (0, 0, pad, 0)),
                               F.pad(batch.mask_BnS, (pad, 0)), F.pad(batch.tokens_BnS, (pad, 0)),
                               batch.salience_Bn, batch.texts, batch.external_ids)
        dev = batch.key_BnK.device
        keep = torch.ones(B, n, dtype=torch.bool, device=dev) if keep_Bn is None \
            else keep_Bn.to(device=dev, dtype=torch.bool)
        self.key_BMK = torch.cat([self.key_BMK, batch.key_BnK.to(self.dtype)], 1)
        self.hidden_BMSD = torch.cat([self.hidden_BMSD, batch.hidden_BnSD.to(self.dtype)], 1)
        self.mask_BMS = torch.cat([self.mask_BMS, batch.mask_BnS], 1)
        self.tokens_BMS = torch.cat([self.tokens_BMS, batch.tokens_BnS.long()], 1)
        self.salience_BM = torch.cat([self.salience_BM, batch.salience_Bn.to(self.dtype)], 1)
        sess = session.to(device=dev, dtype=torch.long) if torch.is_tensor(session) else \
            torch.full((B, n), int(session), dtype=torch.long, device=dev)
        self.session_BM = torch.cat([self.session_BM, sess], 1)
        self.valid_BM = torch.cat([self.valid_BM, keep], 1)
        if self.namespaces is not None:
            for b in range(B):
                ids = batch.external_ids[b] if batch.external_ids else [None] * n
                self.external_ids[b].extend(ids)

    def _rows_of(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._index is None else t.index_select(0, self._index)

    def retrieve(self, query_BTK: torch.Tensor, session: int | torch.Tensor, k: int) -> Candidates:
        sess_B = session_tensor(session, self._B, query_BTK.device)[:, None]
        key, sal = self._rows_of(self.key_BMK), self._rows_of(self.salience_BM)
        session_BM, valid_BM = self._rows_of(self.session_BM), self._rows_of(self.valid_BM)
        if self.read_scope == "previous":
            eligible = valid_BM & (session_BM == sess_B - 1)
        else:
            eligible = valid_BM & (session_BM < sess_B)
        scores = torch.einsum("btk,bmk->btm", retrieval_query(query_BTK.float()),
                              retrieval_key(key.float(),
                                            sal.float() if self.salience_prior else None))
        selected = topk_selection(scores, eligible, k)
        ids = torch.arange(self.size, device=query_BTK.device).expand(self._B, -1)
        ids = ids.masked_fill(~eligible, -1)
        age = (sess_B - session_BM).float()
        return Candidates(key, self.hidden_BMSD, self.mask_BMS, self.tokens_BMS,
                          self.salience_BM, selected, ids, age,
                          scores.masked_fill(~selected, float("-inf")), self._index)

    def rows(self, index: list[int] | torch.Tensor) -> TensorMemory:
        """A view whose row r is this memory's row ``index[r]``: several queries of one
        episode read the same traces, which stay stored (and projected) once."""
        idx = torch.as_tensor(index, dtype=torch.long).to(self.key_BMK.device)
        view = copy.copy(self)
        view._B = len(idx)
        view._index = idx if self._index is None else self._index.index_select(0, idx)
        return view

    def describe(self, row: int, ids: list[int]) -> list[dict]:
        """Namespace, session and external id of slots ``ids`` of row ``row``."""
        if self.namespaces is None:
            raise ValueError("TensorMemory.describe needs a memory made with namespaces")
        base = row if self._index is None else int(self._index[row])
        sessions = self.session_BM[base].tolist()
        out = []
        for i in ids:
            s = sessions[i]
            name = self.session_names[base][s] if self.session_names else str(s)
            out.append({"id": int(i), "namespace": self.namespaces[base], "session": name,
                        "external_id": self.external_ids[base][i]})
        return out
