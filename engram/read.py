"""Engram read: at a chosen layer, every token retrieves its top-k traces and cross-attends
over their tokens, with a learned null key whose value is fixed at zero, and the result is
added to the residual stream through a learned tanh gate.

An empty memory is exactly harmless, trained or not: a token that retrieved nothing puts all
its attention on the null slot, whose value is zero, so the reader adds exactly nothing (and
with no traces at all the residual stream is returned untouched). Attention mass on the null
slot is how a token reads "less" from memory when what it retrieved is not relevant.

Retrieval learns what reading needs: while training, a distillation loss pulls each token's
retrieval distribution (softmax of its scores over the eligible traces) towards where its
attention actually went (the attention mass per trace, detached), weighted by how much it
read from memory. Without it, a top-k retrieval at evaluation misses traces that attention
over *all* traces (training) found.

Attention logit of query token t for trace m, trace token s, head h:
    τ_h · cos(q_th, k_msh)  +  retrieval_scale · cos(q_t, key_m)
over the tokens of the traces t retrieved; the token-level keys come from trace token s and the
values from trace token s+1 (what followed: the detail to copy), its hidden state plus a
learned embedding of its byte. Queries and memory keys share
one projection, so the same context in a trace and in the query lines up from the start;
the token attention is cosine (QK-norm) with a learned per-head temperature τ, which keeps it
sharp although residual-stream states at different positions are alike. A learned per-head
recency slope times the trace's age in sessions is added to the logits, so a fact updated in a
later session can win over its older value (``recency="off"`` removes the term: an ablation;
an age relative to the retrieved traces' mean was tried and read worse: docs/results.md).
A trace's values are scaled by σ(salience_m): how much a trace can contribute is what trains
the write gate (a bias on the attention logits would stop mattering once attention is sharp).
With ``salience_in_read`` false they are not (the write distillation trains the gate instead).

Shapes: B rows, T tokens, M candidate traces, S trace tokens, D model dim, H heads, Dh head
dim (key), Dv head dim (value), K retrieval key dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engram.backends import Candidates
from engram.config import EngramConfig


@dataclass
class ReadStats:
    """Detached 0-d tensors (reading them is the caller's choice: no host sync here)."""

    hits: torch.Tensor  # mean number of traces a token retrieved
    gate: torch.Tensor  # tanh gate value
    memory_mass: torch.Tensor  # attention mass on memory (not the null slot), mean over tokens
    retrieval_loss: torch.Tensor | None = None  # the distillation loss (training only)
    trace_mass: torch.Tensor | None = None  # (rows, T, M) attention mass per token and
    # trace, averaged over heads (training with the write distillation only; detached)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """RMS-normalise the residual stream before projecting (its scale drifts with depth)."""
    return F.rms_norm(x, (x.shape[-1],))


class MemoryReader(nn.Module):
    def __init__(self, d_model: int, cfg: EngramConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.heads
        self.retrieval_query = nn.Linear(d_model, cfg.key_dim, bias=False)
        self.token_key = nn.Linear(d_model, cfg.key_dim, bias=False)  # queries and memory keys
        self.token_value = nn.Linear(d_model, cfg.value_dim, bias=False)
        self.byte_value = nn.Embedding(256, cfg.value_dim)  # the byte itself, for exact copies
        self.out = nn.Linear(cfg.value_dim, d_model, bias=False)
        self.retrieval_scale = nn.Parameter(torch.tensor(float(cfg.retrieval_scale_init)))
        self.log_temperature = nn.Parameter(torch.full((H,), math.log(cfg.temperature_init)))
        self.null_key = nn.Parameter(torch.randn(H, cfg.key_dim // H) / math.sqrt(cfg.key_dim // H))
        self.recency = nn.Parameter(torch.zeros(H))  # logit slope per session of a trace's age
        self.log_retrieval_scale = nn.Parameter(torch.tensor(math.log(20.0)))  # distillation
        self.gate_param = nn.Parameter(torch.tensor(math.atanh(cfg.gate_init)))
        for lin in (self.retrieval_query, self.token_key, self.token_value):
            nn.init.normal_(lin.weight, std=1 / math.sqrt(d_model))
        nn.init.normal_(self.out.weight, std=1 / math.sqrt(cfg.value_dim))

    def gate(self) -> torch.Tensor:
        return torch.tanh(self.gate_param)

    def query(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Unit-length retrieval queries ``(B, T, K)``, matched against trace keys (a pooled
        prefix as the query was tried and retrieved worse: docs/results.md)."""
        return F.normalize(self.retrieval_query(_norm(h_BTD)), dim=-1)

    def _memory_keys_values(self, cand: Candidates, dtype: torch.dtype):
        """Token-level memory keys ``(B, M, S-1, H, Dh)`` and salience-scaled values
        ``(B, M, S-1, H, Dv)``. Without autograd (generation) they are cached for as long as
        the same memory tensors and the same projection weights are in use: a decoding loop
        projects its traces once, not once per token."""
        weights = (self.token_key.weight, self.token_value.weight, self.byte_value.weight)
        stamp = (cand.hidden_BMSD, cand.tokens_BMS, cand.salience_BM, dtype,
                 tuple(w._version for w in weights))
        cached = getattr(self, "_kv_cache", None)
        if (not torch.is_grad_enabled() and cached is not None
                and all(a is b if torch.is_tensor(a) else a == b
                        for a, b in zip(cached[0], stamp, strict=True))):
            return cached[1]
        cfg = self.cfg
        B, M = cand.hidden_BMSD.shape[:2]
        H = cfg.heads
        hid = _norm(cand.hidden_BMSD.to(dtype))
        S1 = hid.shape[2] - 1
        mk = F.normalize(self.token_key(hid[:, :, :-1]).view(B, M, S1, H, -1), dim=-1)
        mv = self.token_value(hid[:, :, 1:]) + self.byte_value(cand.tokens_BMS[:, :, 1:])
        if cfg.salience_in_read:
            weight = torch.sigmoid(cand.salience_BM.float()).to(mv.dtype)  # (B, M)
            mv = mv * weight[:, :, None, None]
        mv = mv.view(B, M, S1, H, -1)
        if not torch.is_grad_enabled():
            self._kv_cache = (stamp, (mk, mv))
        else:
            self._kv_cache = None
        return mk, mv

    def forward(self, h_BTD: torch.Tensor, q_BTK: torch.Tensor, cand: Candidates
                ) -> tuple[torch.Tensor, ReadStats]:
        cfg = self.cfg
        B, T, D = h_BTD.shape
        H = cfg.heads
        dh, dv = cfg.key_dim // H, cfg.value_dim // H
        tau = self.log_temperature.exp().to(h_BTD.dtype)[None, None, :, None]  # (1, 1, H, 1)
        # the temperature scales the unit queries (cheaper than scaling every logit)
        q = F.normalize(self.token_key(_norm(h_BTD)).view(B, T, H, dh), dim=-1) * tau
        null_k = F.normalize(self.null_key, dim=-1).to(q.dtype)
        null_logit = torch.einsum("bthd,hd->bht", q, null_k)
        if not cfg.null_kv:  # no null slot: a token that retrieved nothing reads zeros
            null_logit = torch.full_like(null_logit, float("-inf"))
        M = cand.n_traces
        if M == 0 or cand.hidden_BMSD.shape[2] < 2:
            zero = h_BTD.new_zeros((), dtype=torch.float32)
            return h_BTD, ReadStats(zero, self.gate().detach(), zero)
        mk, mv = self._memory_keys_values(cand, h_BTD.dtype)
        valid = cand.mask_BMS[:, :, :-1] & cand.mask_BMS[:, :, 1:]  # (B, M, S1)
        if cand.row_index is not None:  # projected once per memory row, read by many
            mk, mv, valid = (t.index_select(0, cand.row_index) for t in (mk, mv, valid))
        S1 = mk.shape[2]
        logits = torch.einsum("bthd,bmshd->bhtms", q, mk)
        cos = torch.einsum("btk,bmk->btm", q_BTK, cand.key_BMK.to(q_BTK.dtype))
        bias = (self.retrieval_scale * cos)[:, None]  # (B, 1, T, M)
        logits = logits + (bias + self._recency(cand)).to(logits.dtype)[..., None]
        allowed = cand.selected_BTM[:, None, :, :, None] & valid[:, None, None]
        logits = logits.masked_fill(~allowed, float("-inf")).reshape(B, H, T, M * S1)
        full = torch.cat([logits, null_logit[..., None]], dim=-1)
        attn = torch.softmax(full.float(), dim=-1)
        if not cfg.null_kv:  # a token that retrieved nothing has only -inf logits
            attn = attn.nan_to_num(0.0)
        attn = attn.to(q.dtype)
        mem_attn = attn[..., :-1].view(B, H, T, M, S1)
        mem_out = torch.einsum("bhtms,bmshd->bhtd", mem_attn, mv)
        mass = 1 - attn[..., -1].detach().float().mean()
        y = self.out(mem_out.permute(0, 2, 1, 3).reshape(B, T, H * dv))
        g = self.gate()
        hits = cand.selected_BTM.sum(-1).float().mean()
        distill = self._retrieval_loss(mem_attn, cand) if torch.is_grad_enabled() and \
            cand.scores_BTM.requires_grad else None
        trace_mass = mem_attn.detach().float().sum(-1).mean(1) \
            if cfg.write_distill_coef and torch.is_grad_enabled() else None
        return h_BTD + g.to(h_BTD.dtype) * y, ReadStats(hits, g.detach(), mass, distill,
                                                        trace_mass)

    def _recency(self, cand: Candidates) -> torch.Tensor:
        """(B, H, T, M) logit bias from the traces' age in sessions (see the module doc)."""
        age = cand.age_BM.float()[:, None, :]  # (B, 1, M)
        slope = self.recency.float()[None, :, None, None]  # (1, H, 1, 1)
        if self.cfg.recency == "off":
            return torch.zeros((), device=age.device)
        return slope * age[:, None]

    def _retrieval_loss(self, mem_attn_BHTMS: torch.Tensor, cand: Candidates) -> torch.Tensor:
        """KL(attention mass per trace || softmax of retrieval scores), per token, weighted by
        the token's memory mass (tokens that read nothing teach nothing)."""
        target = mem_attn_BHTMS.detach().float().sum(-1).mean(1)  # (B, T, M)
        weight = target.sum(-1)  # (B, T): attention mass on memory
        p = target / weight.clamp_min(1e-9)[..., None]
        scores = cand.scores_BTM.float()
        # not selected: a large finite negative, so rows with nothing eligible stay finite
        scores = scores.masked_fill(~torch.isfinite(scores), -1e4)
        logq = torch.log_softmax(self.log_retrieval_scale.exp() * scores, dim=-1)
        kl = (p * (torch.log(p.clamp_min(1e-9)) - logq)).sum(-1)
        return (kl * weight).sum() / weight.sum().clamp_min(1e-9)
