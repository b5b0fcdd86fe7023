"""Per-layer balance statistics from routing counts: load, coefficient of variation, max
violation (max load over mean load, minus 1) and dead experts (zero tokens).

The counts stay on the device during training (``FFNAux``); these readers compute every
statistic of every layer on the device and bring them to the host in one transfer (one sync),
so a trainer can call them every ``log_every`` steps at the cost of one small copy.
"""

from __future__ import annotations

import torch

from mhc.moe import FFNAux


def _stats_LS(counts_LX: torch.Tensor) -> torch.Tensor:
    """(L, 3): cv, max violation, dead count per row of counts."""
    c = counts_LX.double()
    mean = c.mean(1).clamp_min(1e-9)
    return torch.stack([c.std(1, unbiased=False) / mean, c.amax(1) / mean - 1,
                        (counts_LX == 0).sum(1).double()], 1)


def _as_dicts(counts_LX: torch.Tensor, host: list[float]) -> list[dict]:
    L, X = counts_LX.shape
    loads, stats = host[: L * X], host[L * X:]
    return [{"load": [int(v) for v in loads[i * X:(i + 1) * X]], "cv": stats[3 * i],
             "max_violation": stats[3 * i + 1], "dead": int(stats[3 * i + 2])}
            for i in range(L)]


def _to_host(*counts: torch.Tensor) -> list[list[float]]:
    """Counts and their statistics for each (L, X) tensor, in one device-to-host copy."""
    parts = [torch.cat([c.double().flatten(), _stats_LS(c).flatten()]) for c in counts]
    flat = torch.cat(parts).tolist()
    out, start = [], 0
    for p in parts:
        out.append(flat[start:start + p.numel()])
        start += p.numel()
    return out


def load_stats(counts: torch.Tensor) -> dict:
    return _as_dicts(counts[None], _to_host(counts[None])[0])[0]


def layer_stats(layers: list[FFNAux]) -> list[dict]:
    """One dict per layer (empty for dense layers): ``experts`` and ``domains`` stats."""
    moe = [i for i, aux in enumerate(layers) if aux.counts_E is not None]
    out: list[dict] = [{} for _ in layers]
    if not moe:
        return out
    experts = torch.stack([layers[i].counts_E for i in moe])
    domains = torch.stack([layers[i].domain_counts_G for i in moe])
    host_e, host_d = _to_host(experts, domains)
    for i, e, d in zip(moe, _as_dicts(experts, host_e), _as_dicts(domains, host_d), strict=True):
        out[i] = {"experts": e, "domains": d}
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


# A router has collapsed when a layer leaves more than this fraction of its experts without
# a token, or sends (nearly) every token to one level-1 group (domain): comparisons of FFN
# kinds must fail on such a row instead of ranking a model that uses a fraction of itself.
MAX_DEAD_FRACTION = 0.25
MAX_DOMAIN_SHARE = 0.95


def collapse_reasons(per_layer: list[dict], max_dead_fraction: float = MAX_DEAD_FRACTION,
                     max_domain_share: float = MAX_DOMAIN_SHARE) -> list[str]:
    """Why the routing of ``layer_stats`` output has collapsed; ``[]`` when it has not.
    Meaningful on tokens that cover every domain of the data (a held-out mix)."""
    reasons = []
    for i, s in enumerate(per_layer):
        if not s:
            continue
        n_experts, dead = len(s["experts"]["load"]), s["experts"]["dead"]
        if dead > max_dead_fraction * n_experts:
            reasons.append(f"layer {i}: {dead} of {n_experts} experts dead "
                           f"(> {max_dead_fraction:.0%})")
        load = s["domains"]["load"]
        total = sum(load)
        if total and len(load) > 1 and max(load) / total > max_domain_share:
            g = load.index(max(load))
            reasons.append(f"layer {i}: domain {g} takes {max(load) / total:.1%} of the tokens "
                           f"(> {max_domain_share:.0%})")
    return reasons
