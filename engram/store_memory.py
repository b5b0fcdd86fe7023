"""``StoreMemory``: Engram's persistent backend on ``memory_store.TraceStore`` (latent space).

Each batch row reads and writes one namespace. A write persists, per kept segment, a
``Trace`` with the retrieval key (plus its salience prior, see ``backends.retrieval_key``) as
``latent_key``, the token-level hidden states as
``latent_value``, the segment's text (so keys can be recomputed when the model changes; the
store embeds it for people's text queries), and meta: salience, valid-token count, model
version and time. A read is one batched, scoped, exact latent search per row (all its query
tokens at once), then one ``get`` of the union of hits.

Reading traces written by another model version warns once (their keys are stale until
``engram traces reindex`` recomputes them).

Shapes: B rows, T query tokens, M candidate traces, S trace tokens, D model dim, K key dim.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from engram.backends import Candidates, retrieval_key, retrieval_query
from memory_store.records import Trace
from memory_store.scope import Scope


class StoreMemory:
    def __init__(self, store, namespaces: list[str], sessions: list[str], model_version: str,
                 exact: bool = True):
        """``sessions``: the session names in order; reads in session i see sessions < i."""
        if len(set(sessions)) != len(sessions):
            raise ValueError("StoreMemory: session names must be distinct")
        self.store, self.namespaces, self.sessions = store, list(namespaces), list(sessions)
        self.model_version, self.exact = model_version, exact
        self._warned = False
        self.last_ids: list[np.ndarray] = []  # per row, the (T, k) ids of the last retrieve

    @property
    def B(self) -> int:
        return len(self.namespaces)

    def write(self, key_BnK, hidden_BnSD, mask_BnS, tokens_BnS, salience_Bn, session: int,
              keep_Bn: torch.Tensor | None = None, texts: list[list[str]] | None = None
              ) -> np.ndarray:
        """Persist the kept traces; returns their ids. ``texts`` default to the segments'
        bytes decoded (the byte tokenizer's text); the value keeps the last valid tokens."""
        B, n = key_BnK.shape[:2]
        if B != self.B:
            raise ValueError(f"memory has {self.B} namespaces, got {B} rows")
        if texts is None:
            texts = [[bytes(tokens_BnS[b, j][mask_BnS[b, j]].tolist()).decode("utf-8", "replace")
                      for j in range(n)] for b in range(B)]
        if len(texts) != B or any(len(t) != n for t in texts):
            raise ValueError("StoreMemory.write: texts must be B lists of n strings")
        keep = torch.ones(B, n, dtype=torch.bool) if keep_Bn is None else keep_Bn.cpu().bool()
        now = time.time()
        traces = []
        for b in range(B):
            for j in range(n):
                if not keep[b, j]:
                    continue
                valid = int(mask_BnS[b, j].sum())
                traces.append(Trace(
                    namespace=self.namespaces[b], session=self.sessions[session], text=texts[b][j],
                    step=j, latent_key=retrieval_key(key_BnK[b, j].detach().float(),
                                                     salience_Bn[b, j].detach()).cpu().numpy(),
                    latent_value=hidden_BnSD[b, j, -valid:].detach().float().cpu().numpy(),
                    meta={"salience": float(salience_Bn[b, j].detach()), "model_version":
                          self.model_version, "time": now, "tokens": valid,
                          "bytes": tokens_BnS[b, j, -valid:].tolist()}))
        if not traces:
            return np.zeros(0, dtype=np.int64)
        return self.store.add(traces)

    def _scope(self, b: int, session: int) -> Scope | None:
        ns = self.namespaces[b]
        known = {s.session for s in self.store.sessions(ns)} if ns in self.store.namespaces() \
            else set()
        earlier = tuple(s for s in self.sessions[:session] if s in known)
        return Scope(self.namespaces[b], sessions=earlier) if earlier else None

    def retrieve(self, query_BTK: torch.Tensor, session: int, k: int) -> Candidates:
        B, T, K = query_BTK.shape
        q = retrieval_query(query_BTK.detach().float()).cpu().numpy()
        rows, self.last_ids = [], []
        for b in range(B):
            scope = self._scope(b, session)
            if scope is None:
                ids = np.full((T, k), -1, np.int64)
            else:
                _, ids = self.store.search_latent(q[b], scope, k, exact=self.exact)
            self.last_ids.append(ids)
            union = sorted({int(i) for i in ids.ravel() if i >= 0})
            rows.append((ids, union, self.store.get(union) if union else []))
        return self._candidates(rows, query_BTK)

    def _candidates(self, rows, query_BTK) -> Candidates:
        device, dtype = query_BTK.device, query_BTK.dtype
        B, T, K = query_BTK.shape
        M = max((len(u) for _, u, _ in rows), default=0)
        S = max((t.latent_value.shape[0] for _, _, ts in rows for t in ts), default=1)
        D = next((t.latent_value.shape[1] for _, _, ts in rows for t in ts), 1)
        key = torch.zeros(B, M, K, dtype=dtype)
        hidden = torch.zeros(B, M, S, D, dtype=dtype)
        mask = torch.zeros(B, M, S, dtype=torch.bool)
        tokens = torch.zeros(B, M, S, dtype=torch.long)
        sal = torch.zeros(B, M, dtype=dtype)
        sel = torch.zeros(B, T, M, dtype=torch.bool)
        ids_BM = torch.full((B, M), -1, dtype=torch.long)
        for b, (ids, union, traces) in enumerate(rows):
            pos = {tid: m for m, tid in enumerate(union)}
            for m, tr in enumerate(traces):
                self._check_version(tr)
                n = tr.latent_value.shape[0]
                key[b, m] = torch.from_numpy(tr.latent_key[:K])  # without the prior column
                hidden[b, m, S - n:] = torch.from_numpy(tr.latent_value)  # right-aligned
                mask[b, m, S - n:] = True
                tokens[b, m, S - n:] = torch.tensor(tr.meta["bytes"], dtype=torch.long)
                sal[b, m] = float(tr.meta.get("salience", 0.0))
                ids_BM[b, m] = int(tr.id)
            for t in range(T):
                for tid in ids[t]:
                    if tid >= 0:
                        sel[b, t, pos[int(tid)]] = True
        return Candidates(key.to(device), hidden.to(device), mask.to(device), tokens.to(device),
                          sal.to(device), sel.to(device), ids_BM.to(device))

    def _check_version(self, trace: Trace) -> None:
        version = trace.meta.get("model_version")
        if version != self.model_version and not self._warned:
            warnings.warn(f"reading traces written by model version {version!r} with "
                          f"{self.model_version!r}: their keys are stale; run "
                          "`engram traces reindex`", stacklevel=3)
            self._warned = True
