"""Per-layer balance statistics from routing counts: load, coefficient of variation, max
violation (max load over mean load, minus 1) and dead experts (zero tokens)."""

from __future__ import annotations

import torch

from mhc.moe import FFNAux


def load_stats(counts: torch.Tensor) -> dict:
    c = counts.float()
    mean = c.mean().clamp_min(1e-9)
    return {"load": counts.tolist(), "cv": float(c.std(unbiased=False) / mean),
            "max_violation": float(c.max() / mean - 1), "dead": int((counts == 0).sum())}


def layer_stats(layers: list[FFNAux]) -> list[dict]:
    """One dict per layer (empty for dense layers): ``experts`` and ``domains`` stats."""
    out = []
    for aux in layers:
        if aux.counts_E is None:
            out.append({})
            continue
        out.append({"experts": load_stats(aux.counts_E),
                    "domains": load_stats(aux.domain_counts_G)})
    return out


def summarize(per_layer: list[dict]) -> dict:
    """Averages over MoE layers, for progress lines and metrics."""
    moe = [s for s in per_layer if s]
    if not moe:
        return {}
    n = len(moe)
    return {"expert_cv": sum(s["experts"]["cv"] for s in moe) / n,
            "expert_max_violation": max(s["experts"]["max_violation"] for s in moe),
            "dead_experts": sum(s["experts"]["dead"] for s in moe),
            "domain_cv": sum(s["domains"]["cv"] for s in moe) / n}
