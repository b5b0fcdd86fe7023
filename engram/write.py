"""Engram write: turn a finished segment into a trace.

For each segment (its hidden states at the memory layer):
  * a learned attention pooling gives the trace's retrieval key (unit length, so inner
    product and L2 rankings agree in every backend);
  * the trace value is the segment's token-level hidden states and its bytes, kept so exact
    details (digits, names) can be copied back at read time;
  * a learned salience gate scores the segment; ``select`` turns scores into write decisions
    under a budget (top fraction of a session's segments) or a threshold.

Shapes: N segments, S tokens per segment, D model dim, K key dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engram.config import EngramConfig


@dataclass
class WrittenTraces:
    key_NK: torch.Tensor  # unit-length retrieval keys
    hidden_NSD: torch.Tensor  # token-level values (hidden states at the memory layer)
    mask_NS: torch.Tensor  # valid tokens
    salience_N: torch.Tensor  # logits of the learned write gate
    tokens_NS: torch.Tensor  # the segment's bytes (the text), aligned with hidden_NSD


class TraceWriter(nn.Module):
    def __init__(self, d_model: int, cfg: EngramConfig):
        super().__init__()
        self.cfg = cfg
        self.pool_score = nn.Linear(d_model, 1)
        self.key_proj = nn.Linear(d_model, cfg.key_dim, bias=False)
        self.salience = nn.Linear(d_model, 1)
        nn.init.zeros_(self.pool_score.weight)  # start as mean pooling
        nn.init.normal_(self.key_proj.weight, std=1 / math.sqrt(d_model))
        nn.init.zeros_(self.salience.weight)
        nn.init.constant_(self.salience.bias, 0.0)

    def forward(self, hidden_NSD: torch.Tensor, mask_NS: torch.Tensor, tokens_NS: torch.Tensor
                ) -> WrittenTraces:
        """Pool the valid tokens into a key and a salience; keep the last
        ``max_trace_tokens`` valid tokens as the value, right-aligned (so a segment's trace
        is the same whether its batch was padded on the left or on the right)."""
        normed = F.rms_norm(hidden_NSD, (hidden_NSD.shape[-1],))
        scores = self.pool_score(normed).squeeze(-1).masked_fill(~mask_NS, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        pooled_ND = torch.einsum("ns,nsd->nd", weights, normed)
        key = F.normalize(self.key_proj(pooled_ND), dim=-1)
        hidden, mask, tokens = right_align(hidden_NSD, mask_NS, tokens_NS,
                                           min(self.cfg.max_trace_tokens, mask_NS.shape[1]))
        # with the write distillation the gate is a head on the pooled features: its strong
        # signal must not reshape the pooling that also makes the retrieval key (measured:
        # retrieval ranked worse when it could, docs/results.md, issue 9)
        gate_in = pooled_ND.detach() if self.cfg.write_distill_coef else pooled_ND
        return WrittenTraces(key, hidden, mask, self.salience(gate_in).squeeze(-1), tokens)

    def salience_loss(self, salience: torch.Tensor, valid: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Pull the mean write probability towards the budget; what the reads need pushes
        individual segments up. ``valid`` (same shape, bool): the segments that count (a
        masked mean, not an index: no host sync)."""
        mean = write_probability(salience, valid)
        return self.cfg.salience_coef * (mean - self.cfg.salience_target) ** 2


def write_probability(salience: torch.Tensor, valid: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Mean σ(salience) over the ``valid`` entries (all when None), in fp32; 0 when none is
    valid (a memory with nothing written)."""
    p = torch.sigmoid(salience.float())
    if valid is None:
        return p.mean()
    w = valid.float()
    return (p * w).sum() / w.sum().clamp_min(1)


def write_distillation_loss(salience_BM: torch.Tensor, session_BM: torch.Tensor,
                            valid_BM: torch.Tensor, mass_BM: torch.Tensor) -> torch.Tensor:
    """Writing learns what reading needs: within each (row, session), the softmax of the
    write gate's logits over the session's segments is pulled towards the share of attention
    mass their traces received from the step's reads (``mass_BM``, detached). A session
    nobody read from teaches nothing. Unlike the budget term this ranks segments *within*
    a session, which is what a budget write policy acts on. Cross-entropy averaged over the
    sessions that were read; no host sync (sessions grouped by a pairwise mask)."""
    M = salience_BM.shape[1]
    same = (session_BM[:, :, None] == session_BM[:, None, :]) & valid_BM[:, None, :] \
        & valid_BM[:, :, None]  # (B, M, M): m and m' are segments of one session
    same = same | torch.eye(M, dtype=torch.bool, device=same.device)  # no empty group
    s = salience_BM.float()
    log_z = torch.logsumexp(s[:, None, :].masked_fill(~same, float("-inf")), dim=-1)
    log_p = (s - log_z).masked_fill(~valid_BM, 0.0)
    mass = mass_BM.float().masked_fill(~valid_BM, 0.0)
    group = torch.einsum("bmn,bn->bm", same.float(), mass)  # the session's total mass
    target = mass / group.clamp_min(1e-9)
    return -(target * log_p).sum() / target.sum().clamp_min(1e-9)


def right_align(hidden_NSD: torch.Tensor, mask_NS: torch.Tensor, tokens_NS: torch.Tensor,
                width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last ``width`` valid tokens of every row, moved to the right end: ``(N, width)``
    layouts with the mask marking them (a gather; no Python loop, no host sync)."""
    N, S = mask_NS.shape
    from_end = torch.cumsum(mask_NS.flip(-1).long(), -1).flip(-1)  # valid tokens at >= p
    keep = mask_NS & (from_end <= width)
    slot = (width - from_end).clamp(0, width - 1)
    dest = torch.where(keep, slot, torch.full_like(slot, width))  # width = a discard column
    hidden = hidden_NSD.new_zeros(N, width + 1, hidden_NSD.shape[-1])
    hidden.scatter_(1, dest[..., None].expand(-1, -1, hidden_NSD.shape[-1]), hidden_NSD)
    tokens = tokens_NS.new_zeros(N, width + 1).scatter_(1, dest, tokens_NS)
    mask = mask_NS.new_zeros(N, width + 1).scatter_(1, dest, keep)
    return hidden[:, :width], mask[:, :width], tokens[:, :width]


def select(salience_N: torch.Tensor, cfg: EngramConfig, policy: str | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Write decisions (bool, N) for one session's segments.

    policy: ``budget`` (top ``ceil(write_budget·N)`` by salience), ``threshold``
    (sigmoid(salience) > write_threshold), ``random`` (the same count as budget, chosen
    uniformly: the baseline the learned gate must beat), ``all``.
    """
    policy = policy or cfg.write_policy
    n = salience_N.numel()
    if policy == "all":
        return torch.ones(n, dtype=torch.bool, device=salience_N.device)
    if policy == "threshold":
        return torch.sigmoid(salience_N) > cfg.write_threshold
    count = min(n, math.ceil(cfg.write_budget * n))
    if policy == "budget":
        order = torch.sort(salience_N.detach().float(), descending=True, stable=True).indices
    elif policy == "random":
        order = torch.randperm(n, generator=generator).to(salience_N.device)
    else:
        raise ValueError(f"unknown write policy {policy!r}")
    keep = torch.zeros(n, dtype=torch.bool, device=salience_N.device)
    keep[order[:count]] = True
    return keep
