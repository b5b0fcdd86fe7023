"""Routers for the mHC FFN: flat, group-limited, hierarchical and progressive.

All four go through the one seam ``kernels.routing.ops`` (Triton or torch reference, chosen by
``MHC_KERNELS``). Shape legend (as in ``kernels``): T tokens, D model dim, G domains,
C components per domain, E = G·C experts (id e = g·C + c), R router outputs, K picks, K1
level-1 picks.

* hierarchical: one projection ``w_DR`` with R = G + E; level 1 = the first G logits.
* progressive:  level-1 logits come from ``DomainEncoder`` (once per segment, shared by all
  layers); each layer projects only the E component logits.
* flat / group_limited: ``w_DE``; group_limited keeps the top-k1 groups (DeepSeek-V3).

Balancing: aux load-balance loss at both levels (Switch-style f·P), router z-loss, and
optional bias-based (aux-loss-free) balancing: a bias added to the selection scores only,
nudged after every step towards equal load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.routing import ops
from kernels.routing.reference import GateSpec
from mhc.config import FFNConfig

_GATE_KIND = {"flat_moe": "flat", "group_limited": "group_limited",
              "hierarchical": "two_level", "progressive": "two_level"}


def gate_spec(cfg: FFNConfig) -> GateSpec:
    return GateSpec(_GATE_KIND[cfg.kind], cfg.n_domains, cfg.n_components, cfg.k1, cfg.k2)


class Router(nn.Module):
    def __init__(self, d_model: int, cfg: FFNConfig, init_std: float = 0.02):
        super().__init__()
        kernels.backend()  # resolve MHC_KERNELS now, eagerly, not inside a compiled region
        self.cfg = cfg
        self.spec = gate_spec(cfg)
        n_proj = cfg.n_experts if cfg.kind == "progressive" else self.spec.n_router_outputs
        self.weight_DR = nn.Parameter(torch.randn(d_model, n_proj) * init_std)
        self.register_buffer("bias_R", torch.zeros(self.spec.n_router_outputs))

    def forward(
        self,
        x_TD: torch.Tensor,
        domain_logits_TG: torch.Tensor | None = None,
        forced_groups_TK1: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weights_TK, ids_TK, logits_TR)`` in x's dtype (logits feed ``losses``)."""
        bias = self.bias_R if self.cfg.bias_balancing else None
        w = self.weight_DR.to(x_TD.dtype)
        if self.cfg.kind == "progressive":
            if domain_logits_TG is None:
                raise ValueError("progressive routing needs the encoder's domain logits")
            logits_TR = torch.cat([domain_logits_TG.to(x_TD.dtype), x_TD @ w], dim=-1)
            weights_TK, ids_TK = ops.gate(logits_TR, self.spec, bias, forced_groups_TK1)
            return weights_TK, ids_TK, logits_TR
        return ops.route(x_TD, w, self.spec, bias, forced_groups_TK1)

    def losses(self, logits_TR: torch.Tensor, counts_E: torch.Tensor,
               domain_counts_G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Switch-style load-balance loss (both levels for two_level) and router z-loss, in
        fp32, from the logits and the (detached) expert counts."""
        cfg, logits_TR = self.cfg, logits_TR.float()
        T = logits_TR.shape[0]
        if T == 0:
            zero = logits_TR.sum()
            return zero, zero
        G, C = cfg.n_domains, cfg.n_components
        f_E = counts_E.float() / counts_E.sum().clamp_min(1)
        if self.spec.kind == "two_level":
            p_TG = torch.softmax(logits_TR[:, :G], -1)
            p_TGC = torch.softmax(logits_TR[:, G:].view(T, G, C), -1)
            p_E = (p_TG[:, :, None] * p_TGC).reshape(T, -1).mean(0)
            f_G = domain_counts_G.float() / domain_counts_G.sum().clamp_min(1)
            aux = cfg.n_experts * (f_E * p_E).sum() + G * (f_G * p_TG.mean(0)).sum()
            z = (torch.logsumexp(logits_TR[:, :G], -1) ** 2).mean()
            z = z + (torch.logsumexp(logits_TR[:, G:].view(T, G, C), -1) ** 2).mean()
        else:
            p_E = torch.softmax(logits_TR, -1).mean(0)
            aux = cfg.n_experts * (f_E * p_E).sum()
            z = (torch.logsumexp(logits_TR, -1) ** 2).mean()
        return aux, z

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts (and domains),
        lower it for over-loaded ones, by a fixed step."""
        if not self.cfg.bias_balancing:
            return
        rate = self.cfg.bias_update_rate
        counts = counts_E.float()
        delta_E = rate * torch.sign(counts.mean() - counts)
        if self.spec.kind == "two_level":
            dom = counts.view(self.cfg.n_domains, -1).sum(1)
            self.bias_R[: self.cfg.n_domains] += rate * torch.sign(dom.mean() - dom)
            self.bias_R[self.cfg.n_domains:] += delta_E
        else:
            self.bias_R += delta_E


class DomainEncoder(nn.Module):
    """Progressive level 1: a tiny causal encoder choosing domains once per segment.

    The domain of segment j is read from the mean byte embedding of everything *before* the
    segment (segment 0 sees nothing and uses the learned bias alone), so no token's routing
    depends on its own future: language-model losses stay honest.
    """

    def __init__(self, vocab_size: int, cfg: FFNConfig):
        super().__init__()
        self.segment_len = cfg.segment_len
        self.embed = nn.Embedding(vocab_size, cfg.encoder_dim)
        self.hidden = nn.Linear(cfg.encoder_dim, cfg.encoder_dim)
        self.out = nn.Linear(cfg.encoder_dim, cfg.n_domains)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, idx_BS: torch.Tensor) -> torch.Tensor:
        """Domain logits per segment ``(B, n_segments, G)``."""
        B, S = idx_BS.shape
        n_seg = -(-S // self.segment_len)
        emb = self.embed(idx_BS)
        prefix = torch.cumsum(emb, dim=1)
        ends = torch.arange(n_seg, device=idx_BS.device) * self.segment_len  # tokens before seg
        sums = torch.zeros(B, n_seg, emb.shape[-1], device=emb.device, dtype=emb.dtype)
        if n_seg > 1:
            sums[:, 1:] = prefix[:, ends[1:] - 1]
        means = sums / ends.clamp_min(1)[None, :, None].to(emb.dtype)
        return self.out(F.gelu(self.hidden(means)))

    def per_token(self, seg_logits_BNG: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Broadcast segment logits to tokens: ``(B, S, G)``."""
        return seg_logits_BNG.repeat_interleave(self.segment_len, dim=1)[:, :seq_len]
