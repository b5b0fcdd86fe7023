"""Parameter accounting from the config alone: total parameters and active parameters per
token, for any FFN kind and sharing mode. Tests check it against the module's real count.

Active parameters per token count every weight a token's forward pass multiplies by: the
embedding row is a lookup and is not counted; the LM head is; each of the K chosen experts
counts in full (a shared base counts once per pick that uses it, as its FLOPs do).
"""

from __future__ import annotations

from dataclasses import dataclass

from mhc.config import FFNConfig, ModelConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    ffn_total: int  # all FFN layers together
    ffn_active: int

    def as_dict(self) -> dict:
        return {"total": self.total, "active": self.active, "ffn_total": self.ffn_total,
                "ffn_active": self.ffn_active}


def ffn_params(d: int, f: FFNConfig) -> tuple[int, int]:
    """(total, active per token) of one FFN layer."""
    if not f.is_moe:
        width = f.hidden * f.top_k
        return 3 * d * width, 3 * d * width
    E, C, G, Fh = f.n_experts, f.n_components, f.n_domains, f.hidden
    router_out = E if f.kind == "progressive" else (G + E if f.two_level else E)
    router = d * router_out
    n_in = E if f.sharing == "none" else C
    total = router + 2 * n_in * d * Fh + E * Fh * d
    per_expert = 3 * d * Fh
    if f.sharing == "lowrank":
        lowrank = 2 * (d * f.lowrank_rank + f.lowrank_rank * Fh)
        total += E * lowrank
        per_expert += lowrank
    return total, router + f.top_k * per_expert


def count(cfg: ModelConfig) -> ParamCount:
    d, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    attn = 4 * d * d + 2 * d  # qkv + proj + the block's two RMSNorm weights
    ffn_total, ffn_active = ffn_params(d, cfg.ffn)
    head = 0 if cfg.tie_weights else V * d
    encoder_table, encoder_mlp = 0, 0
    if cfg.ffn.kind == "progressive":
        e, G = cfg.ffn.encoder_dim, cfg.ffn.n_domains
        encoder_table, encoder_mlp = V * e, e * e + e + e * G + G
    total = V * d + L * (attn + ffn_total) + d + head + encoder_table + encoder_mlp
    # Lookups (token and encoder embeddings) are not active; the LM head (V·d) always is.
    active = L * (attn + ffn_active) + d + V * d + encoder_mlp
    return ParamCount(total, active, L * ffn_total, L * ffn_active)


def sharing_saving(cfg: ModelConfig) -> dict:
    """Total parameters with ``none`` vs this config's sharing mode, and the saving."""
    from dataclasses import replace

    unshared = count(replace(cfg, ffn=replace(cfg.ffn, sharing="none"))).total
    shared = count(cfg).total
    return {"unshared": unshared, "shared": shared, "saved": unshared - shared,
            "saved_fraction": (unshared - shared) / unshared}
