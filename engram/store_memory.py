"""``StoreMemory``: Engram's persistent backend on ``memory_store.TraceStore`` (latent space).

Each batch row reads and writes one namespace. A write persists, per kept segment, a
``Trace`` with the retrieval key (plus its salience prior, see ``backends.retrieval_key``) as
``latent_key``, the token-level hidden states as ``latent_value``, the segment's text (so keys
can be recomputed when the model changes; the store embeds it for people's text queries), and
meta: salience, valid-token count, bytes, model version, time, and the runner's external id
(``"<session>/<segment>"``, also the trace's external id; the session's date is its
``happened_at``). A read is one batched, scoped, exact latent search per row (all
its query tokens at once), then one ``get`` of the union of hits.

Reading traces written by another model version warns once (their keys are stale until
``engram traces reindex`` recomputes them).

Shapes: B rows, T query tokens, M candidate traces, S trace tokens, D model dim, K key dim.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from engram.backends import Candidates, TraceBatch, retrieval_key, retrieval_query
from memory_store.records import Trace
from memory_store.scope import Scope


class StoreMemory:
    def __init__(self, store, namespaces: list[str], sessions: list[str] | list[list[str]],
                 model_version: str, exact: bool = True, salience_prior: bool = True):
        """``sessions``: the session names in order — one list for every row, or one list
        per row; reads in session i see sessions < i of their own row's namespace.
        ``salience_prior``: whether written keys carry the gate's prior (``retrieval_key``)."""
        per_row = bool(sessions) and isinstance(sessions[0], (list, tuple))
        self.sessions = [list(s) for s in sessions] if per_row else list(sessions)
        self._rows = self.sessions if per_row else [self.sessions] * len(namespaces)
        if len(self._rows) != len(namespaces):
            raise ValueError("StoreMemory: one session list per namespace")
        for names in self._rows:
            if len(set(names)) != len(names):
                raise ValueError("StoreMemory: session names must be distinct")
        self.store, self.namespaces = store, list(namespaces)
        self.model_version, self.exact = model_version, exact
        self.salience_prior = salience_prior
        self._order = [{s: i for i, s in enumerate(names)} for names in self._rows]
        self._warned = False
        self.read_scope = "earlier"  # or "previous": only the session just before
        self.last_ids: list[np.ndarray] = []  # per row, the (T, k) ids of the last retrieve

    @property
    def B(self) -> int:
        return len(self.namespaces)

    def write(self, batch: TraceBatch, session: int, keep_Bn: torch.Tensor | None = None
              ) -> np.ndarray:
        """Persist the kept traces; returns their store ids. Texts default to the segments'
        bytes decoded (the byte tokenizer's text); the value keeps the valid tokens."""
        B, n = batch.shape
        if B != self.B:
            raise ValueError(f"memory has {self.B} namespaces, got {B} rows")
        mask, tokens = batch.mask_BnS.cpu(), batch.tokens_BnS.cpu()
        texts = batch.texts or [[bytes(tokens[b, j][mask[b, j]].tolist()).decode(
            "utf-8", "replace") for j in range(n)] for b in range(B)]
        if len(texts) != B or any(len(t) != n for t in texts):
            raise ValueError("StoreMemory.write: texts must be B lists of n strings")
        keep = torch.ones(B, n, dtype=torch.bool) if keep_Bn is None else keep_Bn.cpu().bool()
        keys = retrieval_key(batch.key_BnK.detach().float(), batch.salience_Bn.detach()
                             if self.salience_prior else None).cpu().numpy()
        hidden = batch.hidden_BnSD.detach().float().cpu()
        salience = batch.salience_Bn.detach().float().cpu()
        now = time.time()
        traces = []
        for b in range(B):
            for j in range(n):
                if not keep[b, j]:
                    continue
                valid = int(mask[b, j].sum())
                meta = {"salience": float(salience[b, j]), "model_version": self.model_version,
                        "time": now, "tokens": valid, "bytes": tokens[b, j, -valid:].tolist()}
                if batch.external_ids:
                    meta["external_id"] = batch.external_ids[b][j]
                if batch.happened_at and batch.happened_at[b]:
                    meta["happened_at"] = batch.happened_at[b]
                traces.append(Trace(
                    namespace=self.namespaces[b], session=self._rows[b][session],
                    text=texts[b][j], step=j, latent_key=keys[b, j],
                    latent_value=hidden[b, j, -valid:].numpy(), meta=meta,
                    external_id=meta.get("external_id"), happened_at=meta.get("happened_at")))
        if not traces:
            return np.zeros(0, dtype=np.int64)
        return self.store.add(traces)

    def _scope(self, b: int, session: int) -> Scope | None:
        ns = self.namespaces[b]
        known = {s.session for s in self.store.sessions(ns)} if ns in self.store.namespaces() \
            else set()
        names = self._rows[b][:session]
        if self.read_scope == "previous":
            names = names[-1:]
        earlier = tuple(s for s in names if s in known)
        return Scope(ns, sessions=earlier) if earlier else None

    def retrieve(self, query_BTK: torch.Tensor, session: int | torch.Tensor, k: int) -> Candidates:
        B, T, K = query_BTK.shape
        sess = session.tolist() if torch.is_tensor(session) else [int(session)] * B
        q = retrieval_query(query_BTK.detach().float()).cpu().numpy()
        rows, self.last_ids = [], []
        for b in range(B):
            scope = self._scope(b, sess[b])
            if scope is None:
                scores, ids = np.full((T, k), -np.inf, np.float32), np.full((T, k), -1, np.int64)
            else:
                scores, ids = self.store.search_latent(q[b], scope, k, exact=self.exact)
            self.last_ids.append(ids)
            union = sorted({int(i) for i in ids.ravel() if i >= 0})
            rows.append((scores, ids, union, self.store.get(union) if union else []))
        return self._candidates(rows, query_BTK, sess)

    def _candidates(self, rows, query_BTK, sess: list[int]) -> Candidates:
        device, dtype = query_BTK.device, query_BTK.dtype
        B, T, K = query_BTK.shape
        M = max((len(u) for _, _, u, _ in rows), default=0)
        S = max((t.latent_value.shape[0] for *_, ts in rows for t in ts), default=1)
        D = next((t.latent_value.shape[1] for *_, ts in rows for t in ts), 1)
        key = torch.zeros(B, M, K, dtype=dtype)
        hidden = torch.zeros(B, M, S, D, dtype=dtype)
        mask = torch.zeros(B, M, S, dtype=torch.bool)
        tokens = torch.zeros(B, M, S, dtype=torch.long)
        sal = torch.zeros(B, M, dtype=dtype)
        age = torch.zeros(B, M)
        sel = torch.zeros(B, T, M, dtype=torch.bool)
        score = torch.full((B, T, M), float("-inf"))
        ids_BM = torch.full((B, M), -1, dtype=torch.long)
        for b, (scores, ids, union, traces) in enumerate(rows):
            pos = {tid: m for m, tid in enumerate(union)}
            for m, tr in enumerate(traces):
                self._check_version(tr)
                n = tr.latent_value.shape[0]
                key[b, m] = torch.from_numpy(tr.latent_key[:K])  # without the prior column
                hidden[b, m, S - n:] = torch.from_numpy(tr.latent_value)  # right-aligned
                mask[b, m, S - n:] = True
                tokens[b, m, S - n:] = torch.tensor(tr.meta["bytes"], dtype=torch.long)
                sal[b, m] = float(tr.meta.get("salience", 0.0))
                age[b, m] = sess[b] - self._order[b].get(tr.session, sess[b] - 1)
                ids_BM[b, m] = int(tr.id)
            for t in range(T):
                for j, tid in enumerate(ids[t]):
                    if tid >= 0:
                        sel[b, t, pos[int(tid)]] = True
                        score[b, t, pos[int(tid)]] = float(scores[t, j])
        return Candidates(key.to(device), hidden.to(device), mask.to(device), tokens.to(device),
                          sal.to(device), sel.to(device), ids_BM.to(device), age.to(device),
                          score.to(device))

    def rows(self, index: list[int] | torch.Tensor) -> StoreMemory:
        """A memory whose row r reads namespace ``namespaces[index[r]]``."""
        index = index.tolist() if torch.is_tensor(index) else list(index)
        view = StoreMemory(self.store, [self.namespaces[i] for i in index],
                           [self._rows[i] for i in index], self.model_version, self.exact,
                           self.salience_prior)
        view._warned, view.read_scope = self._warned, self.read_scope
        return view

    def describe(self, row: int, ids: list[int]) -> list[dict]:
        """What the store itself records for trace ids ``ids`` (namespace, session, external
        id): read back from LMDB, not assumed from the row."""
        return [{"id": int(t.id), "namespace": t.namespace, "session": t.session,
                 "external_id": t.meta.get("external_id")} for t in self.store.get(list(ids))]

    def clear(self) -> None:
        """Delete every trace of this memory's namespaces."""
        present = set(self.store.namespaces())
        for ns in dict.fromkeys(self.namespaces):
            if ns in present:
                self.store.delete_namespace(ns)

    def _check_version(self, trace: Trace) -> None:
        version = trace.meta.get("model_version")
        if version != self.model_version and not self._warned:
            warnings.warn(f"reading traces written by model version {version!r} with "
                          f"{self.model_version!r}: their keys are stale; run "
                          "`engram traces reindex`", stacklevel=3)
            self._warned = True
