"""The mHC FFN layer: route → permute → experts → weighted combine (or the dense baseline).

Every step goes through ``kernels.routing.ops`` so ``MHC_KERNELS`` switches the whole layer
between the Triton kernels and the torch reference. The layer computes in the autocast dtype
when autocast is on (the residual stream stays fp32): its input is cast once here, so the
routing ops and every expert matmul see bf16 rows and take the fast kernels; its output is
added back to the fp32 stream by the block. Nothing here synchronizes with the host: the
expert counts come from the permutation (on the device) and feed the balance loss and the
statistics, which are read only when ``mhc.stats`` is called.

Shape legend: B batch, S sequence, T = B·S tokens, D model dim, G domains, C components, K
picks, K1 level-1 picks, N = T·K routed rows, E experts, P = E expert slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kernels.routing import ops
from mhc.config import FFNConfig
from mhc.experts import DenseFFN, Experts, expert_to_slot
from mhc.router import Router


@dataclass
class FFNAux:
    """What one FFN layer reports: losses (differentiable) and load statistics (detached,
    on the device)."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    counts_E: torch.Tensor | None = None
    domain_counts_G: torch.Tensor | None = None
    domain_ids_TK1: torch.Tensor | None = None


# Data parallel (``sessions.distributed``): sums a layer's expert counts over the ranks during a
# training step, so the balance loss, the statistics and the bias updates see the global load.
_counts_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None


def set_counts_reducer(fn: Callable[[torch.Tensor], torch.Tensor] | None):
    """Install ``fn`` (None: local counts, one process); returns the previous one."""
    global _counts_reducer
    previous, _counts_reducer = _counts_reducer, fn
    return previous


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the FFN computes in: autocast's for x's device when autocast is on, else
    x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


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
        x_BSD = x_BSD.to(compute_dtype(x_BSD))
        if not cfg.is_moe:
            zero = x_BSD.new_zeros((), dtype=torch.float32)
            return self.dense(x_BSD), FFNAux(zero, zero)
        B, S, D = x_BSD.shape
        G, C, E = cfg.n_domains, cfg.n_components, cfg.n_experts
        x_TD = x_BSD.reshape(B * S, D)
        dom_TG = None if domain_logits_BSG is None else domain_logits_BSG.reshape(B * S, -1)
        forced = None if forced_groups_BSK1 is None else forced_groups_BSK1.reshape(B * S, -1)
        weights_TK, ids_TK, logits_TR = self.router(x_TD, dom_TG, forced)
        x_ND, order_N, counts_P = ops.permute(x_TD, expert_to_slot(ids_TK, G, C), E)
        counts_E = counts_P.detach().view(C, G).t().reshape(E)  # slot c·G+g -> expert g·C+c
        if _counts_reducer is not None:
            counts_E = _counts_reducer(counts_E)
        domain_counts_G = counts_E.view(G, C).sum(1)
        aux, z = self.router.losses(logits_TR, counts_E, domain_counts_G)
        y_TD = ops.combine(self.experts(x_ND, counts_P), order_N, weights_TK)
        domain_ids = ids_TK[:, :: cfg.k2] // C if cfg.two_level else None
        return y_TD.view(B, S, D), FFNAux(aux, z, counts_E, domain_counts_G, domain_ids)
