"""Expert SwiGLU MLPs with cross-domain component sharing.

Experts are stored component-major: slot p = c·G + g holds expert e = g·C + c (domain g,
component c), so the tokens of every component index c form one contiguous run once sorted by
slot. That lets a shared projection run as one grouped matmul over C groups while the
per-expert parts run over E groups.

sharing:
  none     gate/up/down per expert                    3·D·F per expert
  base     gate/up shared by component c across the G domains, down per expert
  lowrank  base gate/up + a per-expert rank-r delta (x·A_e·B_e) on each, down per expert

The gate and up projections are one weight, ``[W_gate | W_up]`` (H = 2F columns), so each
expert reads its rows once in one grouped matmul of width 2F; ``kernels.mlp.swiglu`` turns
the (N, 2F) result into silu(gate) · up. The dense baseline uses the same layout and op.

Every matmul goes through ``ops.grouped_mm`` (``torch._grouped_mm`` on CUDA bf16) in the
dtype of the rows it receives: the FFN casts its input to the autocast dtype, and the fp32
master weights are used through bf16 copies made once per optimizer step
(``mhc.compute_copies``).

Shape legend: N routed rows (expert-sorted), D model dim, F expert hidden, H = 2F (gate
columns, then up columns), P = E slots, C components, r low rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.mlp import swiglu
from kernels.routing import ops
from mhc.compute_copies import compute_weight
from mhc.config import FFNConfig


def expert_to_slot(ids_TK: torch.Tensor, n_domains: int, n_components: int) -> torch.Tensor:
    """Expert id e = g·C + c → storage slot p = c·G + g."""
    return (ids_TK % n_components) * n_domains + ids_TK // n_components


class Experts(nn.Module):
    def __init__(self, d_model: int, cfg: FFNConfig, init_std: float = 0.02,
                 out_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        E, C, D, Fh = cfg.n_experts, cfg.n_components, d_model, cfg.hidden
        n_in = E if cfg.sharing == "none" else C
        self.w_gate_up_PDH = nn.Parameter(torch.randn(n_in, D, 2 * Fh) * init_std)
        self.w_down_PFD = nn.Parameter(torch.randn(E, Fh, D) * out_std)
        if cfg.sharing == "lowrank":
            r = cfg.lowrank_rank
            # B starts at zero so every expert starts at its shared base (a standard LoRA init).
            self.a_gate_PDr = nn.Parameter(torch.randn(E, D, r) / math.sqrt(D))
            self.b_gate_PrF = nn.Parameter(torch.zeros(E, r, Fh))
            self.a_up_PDr = nn.Parameter(torch.randn(E, D, r) / math.sqrt(D))
            self.b_up_PrF = nn.Parameter(torch.zeros(E, r, Fh))
        self._compute_copies: dict = {}  # name -> (stamp, copy): see mhc.compute_copies

    def _w(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return compute_weight(self._compute_copies, name, getattr(self, name), dtype)

    def forward(self, x_ND: torch.Tensor, counts_P: torch.Tensor) -> torch.Tensor:
        """Rows sorted by slot with ``counts_P`` rows per slot → outputs in the same order
        and dtype."""
        cfg = self.cfg
        if cfg.sharing == "none":
            counts_in = counts_P
        else:
            counts_in = counts_P.view(cfg.n_components, cfg.n_domains).sum(1)
        dt = x_ND.dtype
        h_NH = ops.grouped_mm(x_ND, self._w("w_gate_up_PDH", dt), counts_in)
        if cfg.sharing == "lowrank":
            def delta(a, b):
                return ops.grouped_mm(ops.grouped_mm(x_ND, self._w(a, dt), counts_P),
                                      self._w(b, dt), counts_P)

            h_NH = h_NH + torch.cat([delta("a_gate_PDr", "b_gate_PrF"),
                                     delta("a_up_PDr", "b_up_PrF")], 1)
        return ops.grouped_mm(swiglu(h_NH), self._w("w_down_PFD", dt), counts_P)


class DenseFFN(nn.Module):
    """The dense baseline: one SwiGLU MLP of width ``hidden · k1 · k2`` (equal active params)."""

    def __init__(self, d_model: int, hidden: int, init_std: float = 0.02, out_std: float = 0.02):
        super().__init__()
        self.w_gate_up = nn.Parameter(torch.randn(d_model, 2 * hidden) * init_std)  # [gate | up]
        self.w_down = nn.Parameter(torch.randn(hidden, d_model) * out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        return swiglu(x @ self.w_gate_up.to(dt)) @ self.w_down.to(dt)
