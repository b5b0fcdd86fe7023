"""The mHC FFN layer: route → permute → experts → weighted combine (or the dense baseline).

Every step goes through ``kernels.routing.ops`` so ``MHC_KERNELS`` switches the whole layer
between the Triton kernels and the torch reference. Shape legend: B batch, S sequence, T = B·S
tokens, D model dim, G domains, K picks, K1 level-1 picks, N = T·K routed rows, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.routing import ops
from mhc.config import FFNConfig
from mhc.experts import DenseFFN, Experts, expert_to_slot
from mhc.router import Router


@dataclass
class FFNAux:
    """What one FFN layer reports: losses (differentiable) and load statistics (detached)."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    counts_E: torch.Tensor | None = None
    domain_counts_G: torch.Tensor | None = None
    domain_ids_TK1: torch.Tensor | None = None


class MHCFFN(nn.Module):
    def __init__(self, d_model: int, cfg: FFNConfig, init_std: float = 0.02,
                 out_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        if cfg.is_moe:
            self.router = Router(d_model, cfg, init_std)
            self.experts = Experts(d_model, cfg, init_std, out_std)
        else:
            self.dense = DenseFFN(d_model, cfg.hidden * cfg.top_k, init_std, out_std)

    def forward(
        self,
        x_BSD: torch.Tensor,
        domain_logits_BSG: torch.Tensor | None = None,
        forced_groups_BSK1: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, FFNAux]:
        cfg = self.cfg
        if not cfg.is_moe:
            zero = x_BSD.new_zeros((), dtype=torch.float32)
            return self.dense(x_BSD), FFNAux(zero, zero)
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        dom_TG = None if domain_logits_BSG is None else domain_logits_BSG.reshape(B * S, -1)
        forced = None if forced_groups_BSK1 is None else forced_groups_BSK1.reshape(B * S, -1)
        r = self.router(x_TD, dom_TG, forced)
        slots_TK = expert_to_slot(r.ids_TK, cfg.n_domains, cfg.n_components)
        x_ND, order_N, counts_P = ops.permute(x_TD, slots_TK, cfg.n_experts)
        y_ND = self.experts(x_ND, counts_P)
        y_TD = ops.combine(y_ND, order_N, r.weights_TK)
        domain_ids = (r.ids_TK[:, :: cfg.k2] // cfg.n_components) if cfg.two_level else None
        return y_TD.view(B, S, D), FFNAux(
            r.aux_loss, r.z_loss, r.counts_E.detach(), r.domain_counts_G.detach(), domain_ids)
