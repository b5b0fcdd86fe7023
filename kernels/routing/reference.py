"""Pure-torch reference of the routing ops: the ground truth the Triton kernels must match.

Shape legend: see ``kernels/__init__.py`` (T tokens, D model dim, G domains, C components per
domain, E = G·C experts, R router outputs, K picks per token, K1 level-1 picks, N = T·K rows).

Selection kinds (one family, the same top-k machinery with different masks):
  * ``flat``          softmax over the E logits, top-K experts.
  * ``group_limited`` DeepSeek-V3 style: softmax over E; each of the G groups is scored by the
                      sum of its top-2 expert probabilities; the top-K1 groups are kept and the
                      top-K experts are chosen among them.
  * ``two_level``     hierarchical / progressive mHC: R = G + E logits; level 1 is a softmax
                      over the first G (domains), top-K1 domains; level 2 is a softmax over the
                      C components of each chosen domain, top-k2 there.

Weights. ``flat`` / ``group_limited``: the chosen probabilities renormalized to sum to 1 per
token. ``two_level``: renormalized within level 2 only,

    w(g, c) = p(g) · p(c | g) / Σ_{c' picked in g} p(c' | g),

so a token's weights sum to Σ_{g picked} p(g) ≤ 1. Why not renormalize across both levels:
then p(g) cancels whenever k1 = 1 (the weights become p(c|g)/Σ p(c'|g)), and the level-1
router gets no gradient from the language-model loss at all — only the auxiliary losses
would train it. Keeping p(g) as a scale on its domain's output is Switch Transformer's
top-1 rule applied to level 1 (the gate value of a single pick is used unnormalized, which is
what lets the router learn), while inside a domain the components stay a convex combination
(a plain renormalized top-k2 MoE). The fully unnormalized product p(g)·p(c|g) would also
learn, but shrinks the layer's output by the level-2 mass too (to 1/16 at k 2×2 of 8×8 with
uniform routers); with one domain (G = 1, p(g) = 1) the rule reduces to ``flat``.

An optional ``bias_R``
(aux-loss-free balancing) is added to the probabilities for *selection only*; weights use the
unbiased probabilities. ``forced_groups_TK1`` (two_level) replaces the level-1 choice, e.g.
with a domain chosen once per sequence (progressive routing) or a label.

Tie rule (shared with the kernels): among equal scores the lower index wins. Picks are listed
best first: domains by descending (biased) score, then components within each domain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("flat", "group_limited", "two_level")


@dataclass(frozen=True)
class GateSpec:
    """What to select. ``k1`` groups/domains, ``k2`` components per group (two_level) or
    ``k1·k2`` experts in total (flat, group_limited)."""

    kind: str
    n_groups: int
    n_components: int
    k1: int
    k2: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"GateSpec.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("n_groups", "n_components", "k1", "k2"):
            if getattr(self, name) < 1:
                raise ValueError(f"GateSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.k1 > self.n_groups:
            raise ValueError(f"GateSpec.k1={self.k1} exceeds n_groups={self.n_groups}")
        if self.kind == "two_level" and self.k2 > self.n_components:
            raise ValueError(f"GateSpec.k2={self.k2} exceeds n_components={self.n_components}")
        if self.kind != "two_level" and self.top_k > self.k1 * self.n_components:
            raise ValueError(
                f"GateSpec: top_k={self.top_k} exceeds the experts in k1={self.k1} groups"
            )

    @property
    def n_experts(self) -> int:
        return self.n_groups * self.n_components

    @property
    def top_k(self) -> int:
        return self.k1 * self.k2

    @property
    def n_router_outputs(self) -> int:
        return self.n_groups + self.n_experts if self.kind == "two_level" else self.n_experts


def topk_lowest_index_ties(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, best first; equal scores keep ascending index order."""
    values, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def gate(
    logits_TR: torch.Tensor,
    spec: GateSpec,
    bias_R: torch.Tensor | None = None,
    forced_groups_TK1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select experts from router logits. Returns ``(weights_TK, ids_TK)``.

    ``weights_TK`` are in ``logits_TR``'s dtype (computed in float32, or float64 for float64
    logits), non-negative, summing to
    1 per token (``flat``, ``group_limited``) or to the chosen domains' p(g) (``two_level``,
    see the module docstring); ``ids_TK`` are int64 expert ids in ``[0, E)``, distinct per
    token.
    """
    T, R = logits_TR.shape
    if R != spec.n_router_outputs:
        raise ValueError(f"logits have {R} columns, spec needs {spec.n_router_outputs}")
    logits = logits_TR.to(torch.promote_types(logits_TR.dtype, torch.float32))
    bias = None if bias_R is None else bias_R.to(logits.dtype)
    G, C, K1 = spec.n_groups, spec.n_components, spec.k1
    if spec.kind == "two_level":
        probs_TG = torch.softmax(logits[:, :G], dim=-1)
        probs_TGC = torch.softmax(logits[:, G:].view(T, G, C), dim=-1)
        sel_TG, sel_TGC = probs_TG, probs_TGC
        if bias is not None:
            sel_TG = probs_TG + bias[:G]
            sel_TGC = probs_TGC + bias[G:].view(G, C)
        if forced_groups_TK1 is None:
            _, groups_TK1 = topk_lowest_index_ties(sel_TG, K1)
        else:
            groups_TK1 = forced_groups_TK1.long()
            if groups_TK1.shape != (T, K1):
                raise ValueError(f"forced_groups must be {(T, K1)}, got {tuple(groups_TK1.shape)}")
        p_group_TK1 = probs_TG.gather(1, groups_TK1)
        idx = groups_TK1[:, :, None].expand(T, K1, C)
        _, comp_TK1k2 = topk_lowest_index_ties(sel_TGC.gather(1, idx), spec.k2)
        p_comp_TK1k2 = probs_TGC.gather(1, idx).gather(2, comp_TK1k2)
        p_comp_TK1k2 = p_comp_TK1k2 / p_comp_TK1k2.sum(-1, keepdim=True).clamp_min(1e-20)
        weights_TK = (p_group_TK1[:, :, None] * p_comp_TK1k2).reshape(T, spec.top_k)
        ids_TK = (groups_TK1[:, :, None] * C + comp_TK1k2).reshape(T, spec.top_k)
    else:
        probs_TE = torch.softmax(logits, dim=-1)
        sel_TE = probs_TE if bias is None else probs_TE + bias
        if spec.kind == "group_limited":
            sel_TGC = sel_TE.view(T, G, C)
            top2 = topk_lowest_index_ties(sel_TGC, min(2, C))[0].sum(-1)
            _, groups_TK1 = topk_lowest_index_ties(top2, K1)
            keep_TG = torch.zeros(T, G, dtype=torch.bool, device=logits.device)
            keep_TG.scatter_(1, groups_TK1, True)
            keep_TE = keep_TG[:, :, None].expand(T, G, C).reshape(T, G * C)
            sel_TE = sel_TE.masked_fill(~keep_TE, float("-inf"))
        _, ids_TK = topk_lowest_index_ties(sel_TE, spec.top_k)
        weights_TK = probs_TE.gather(1, ids_TK)
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return weights_TK.to(logits_TR.dtype), ids_TK


def route(
    x_TD: torch.Tensor,
    w_DR: torch.Tensor,
    spec: GateSpec,
    bias_R: torch.Tensor | None = None,
    forced_groups_TK1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router projection + selection. Returns ``(weights_TK, ids_TK, logits_TR)``; the logits
    feed the balance and z losses."""
    logits_TR = x_TD @ w_DR
    weights_TK, ids_TK = gate(logits_TR, spec, bias_R, forced_groups_TK1)
    return weights_TK, ids_TK, logits_TR


def expert_counts(ids_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: int64 ``counts_E``. (A scatter-add, not ``bincount``:
    bincount's output size depends on the data, a host sync on CUDA and a graph break.)"""
    ids = ids_TK.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(0, ids, torch.ones_like(ids))


def permute(
    x_TD: torch.Tensor, ids_TK: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather token copies into expert order.

    Returns ``(x_ND, order_N, counts_E)``: row n of ``x_ND`` is token ``order_N[n] // K``
    (slot ``order_N[n]`` of the flattened ``ids_TK``); rows are grouped by ascending expert id
    and, within an expert, by ascending slot (a stable sort: deterministic).
    """
    T, K = ids_TK.shape
    order_N = torch.sort(ids_TK.reshape(-1), stable=True).indices
    x_ND = x_TD.index_select(0, order_N // K) if T else x_TD.new_zeros(0, x_TD.shape[1])
    return x_ND, order_N, expert_counts(ids_TK, n_experts)


def combine(y_ND: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Weighted scatter back to token order: ``y_TD[t] = Σ_k weights_TK[t, k] · y_ND[row of
    slot t·K+k]``, summed over k in order (no atomics: deterministic)."""
    T, K = weights_TK.shape
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    y_TKD = y_ND.index_select(0, inverse_N).view(T, K, y_ND.shape[1])
    return (y_TKD * weights_TK[:, :, None].to(y_ND.dtype)).sum(1)


def grouped_mm(x_ND: torch.Tensor, w_GAB: torch.Tensor, counts_G: torch.Tensor) -> torch.Tensor:
    """Segment-wise matmul: rows of segment g (``counts_G[g]`` consecutive rows) times
    ``w_GAB[g]``. Returns ``y_NB``. A plain loop (one host sync for the counts): the ground
    truth, and the CPU path of ``kernels.routing.grouped``."""
    pieces = []
    start = 0
    for g, n in enumerate(counts_G.tolist()):
        if n:
            pieces.append(x_ND[start : start + n] @ w_GAB[g])
        start += n
    if not pieces:
        return x_ND.new_zeros(x_ND.shape[0], w_GAB.shape[2])
    return torch.cat(pieces, 0)
