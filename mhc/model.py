"""The mHC model: a decoder-only byte-level transformer whose FFN is an mHC layer.

Block: ``h = x + attn(norm(x)); h = h + ffn(norm(h)); h = layer_hook(i, h)``. The optional
``layer_hook`` is the single place where another package (Engram's memory read) can act on a
block's output; with no hook the model is the plain mHC model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mhc import compute_copies
from mhc.attention import CausalSelfAttention, RMSNorm, rope_tables
from mhc.config import ModelConfig
from mhc.moe import MHCFFN, FFNAux
from mhc.router import DomainEncoder

LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # None when stopped early (stop_after_layer)
    loss: torch.Tensor | None = None  # LM loss (nats per byte) + weighted router losses
    lm_loss: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None
    layers: list[FFNAux] = field(default_factory=list)
    hidden: torch.Tensor | None = None  # final hidden states (B, S, D), before the norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = MHCFFN(cfg.d_model, cfg.ffn, cfg.init_std, out_std)

    def forward(self, x, cos, sin, domain_logits=None, forced_groups=None):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        y, aux = self.ffn(self.ffn_norm(x), domain_logits, forced_groups)
        return x + y, aux


class MHCModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.domain_encoder = (
            DomainEncoder(cfg.vocab_size, cfg.ffn) if cfg.ffn.kind == "progressive" else None)
        nn.init.normal_(self.tok_emb.weight, std=cfg.init_std)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=cfg.init_std)
            nn.init.normal_(block.attn.proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The parameters' gradients and those of the experts' attached compute copies
        (``mhc.compute_copies``, owned by the trainer's optimizer on CUDA)."""
        super().zero_grad(set_to_none)
        compute_copies.zero_grad(self.parameters(), set_to_none)

    def forward(
        self,
        idx_BS: torch.Tensor,
        targets_BS: torch.Tensor | None = None,
        domain_targets: torch.Tensor | None = None,
        forced_domains: torch.Tensor | None = None,
        layer_hook: LayerHook | None = None,
        return_hidden: bool = False,
        stop_after_layer: int | None = None,
    ) -> ModelOutput:
        """``domain_targets``: per-sequence labels ``(B,)`` (int, -1 = unknown) or teacher
        probabilities ``(B, G)`` for the progressive encoder (labels outside [0, G) are
        ignored). ``forced_domains``: ``(B,)`` or ``(B, K1)`` domain ids imposed on every token
        of the sequence (two-level kinds).
        ``stop_after_layer=i``: run blocks 0..i only and return their hidden states (no
        logits, no loss), e.g. to read a layer's states without paying for the rest."""
        cfg = self.cfg
        B, S = idx_BS.shape
        if S > cfg.seq_len:
            raise ValueError(f"sequence length {S} exceeds ModelConfig.seq_len={cfg.seq_len}")
        x = self.tok_emb(idx_BS)
        domain_logits, forced, seg_logits = None, None, None
        if forced_domains is not None:
            if not cfg.ffn.two_level:
                raise ValueError("forced_domains needs a hierarchical or progressive FFN")
            forced = forced_domains.reshape(B, -1)[:, None, :].expand(B, S, cfg.ffn.k1)
        if self.domain_encoder is not None:
            seg_logits = self.domain_encoder(idx_BS)
            domain_logits = self.domain_encoder.per_token(seg_logits, S)
            if forced is None:  # the level-1 choice, made once per segment for all layers
                forced = torch.topk(domain_logits.float(), cfg.ffn.k1, dim=-1).indices
        layers = []
        for i, block in enumerate(self.blocks):
            x, aux = block(x, self.rope_cos, self.rope_sin, domain_logits, forced)
            layers.append(aux)
            if layer_hook is not None:
                x = layer_hook(i, x)
            if stop_after_layer == i:
                return ModelOutput(logits=None, layers=layers, hidden=x)
        logits = self.lm_head(self.norm(x))
        out = ModelOutput(logits=logits, layers=layers, hidden=x if return_hidden else None)
        if targets_BS is not None:
            out.lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                          targets_BS.reshape(-1))
            out.router_loss = self._router_loss(layers, seg_logits, domain_targets)
            out.loss = out.lm_loss + out.router_loss
        return out

    def _router_loss(self, layers, seg_logits, domain_targets) -> torch.Tensor:
        f = self.cfg.ffn
        loss = sum(f.aux_loss_coef * a.aux_loss + f.z_loss_coef * a.z_loss for a in layers)
        loss = loss / len(layers)
        if seg_logits is not None and domain_targets is not None:
            logp = torch.log_softmax(seg_logits.float(), -1)  # (B, n_seg, G)
            if domain_targets.dtype.is_floating_point:
                target = domain_targets[:, None, :].expand_as(logp)
                loss = loss + f.domain_distill_coef * -(target * logp).sum(-1).mean()
            else:
                # labels outside [0, G) (more data domains than router domains) count as
                # unknown; masked, not indexed, so the step needs no host sync
                known = ((domain_targets >= 0) & (domain_targets < f.n_domains)).to(logp.dtype)
                tgt = domain_targets.clamp(0, f.n_domains - 1)[:, None, None]
                nll = -logp.gather(-1, tgt.expand(*logp.shape[:2], 1))[..., 0]  # (B, n_seg)
                ce = (nll * known[:, None]).sum() / (known.sum() * nll.shape[1]).clamp_min(1)
                loss = loss + f.domain_label_coef * ce
        return loss

    @torch.no_grad()
    def update_router_biases(self, layers: list[FFNAux]) -> None:
        """Aux-loss-free balancing step (no-op unless ``ffn.bias_balancing``)."""
        if not (self.cfg.ffn.is_moe and self.cfg.ffn.bias_balancing):
            return
        for block, aux in zip(self.blocks, layers, strict=True):
            block.ffn.router.update_bias(aux.counts_E)
