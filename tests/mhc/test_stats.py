"""Balance statistics (``mhc.stats``): every layer's numbers equal a direct per-layer
computation, and reading them costs one device-to-host transfer for the whole model (they are
read every ``log_every`` steps; each read is one sync, never one per layer or statistic)."""

from __future__ import annotations

import torch

from mhc.moe import FFNAux
from mhc.stats import layer_stats, load_stats, summarize


def _direct(counts: torch.Tensor) -> dict:
    c = counts.double()
    mean = c.mean()
    return {"load": counts.tolist(), "cv": float(c.std(unbiased=False) / mean),
            "max_violation": float(c.max() / mean - 1), "dead": int((counts == 0).sum())}


def _layers():
    g = torch.Generator().manual_seed(0)
    zero = torch.zeros(())
    out = []
    for i in range(3):
        counts = torch.randint(0, 50, (12,), generator=g)
        counts[i] = 0  # a dead expert
        out.append(FFNAux(zero, zero, counts, counts.view(3, 4).sum(1)))
    return [FFNAux(zero, zero)] + out  # a dense layer first: it reports nothing


def test_layer_stats_equal_direct_computation():
    layers = _layers()
    stats = layer_stats(layers)
    assert stats[0] == {}
    for aux, s in zip(layers[1:], stats[1:], strict=True):
        for key, counts in (("experts", aux.counts_E), ("domains", aux.domain_counts_G)):
            want = _direct(counts)
            assert s[key]["load"] == want["load"] and s[key]["dead"] == want["dead"]
            for name in ("cv", "max_violation"):
                assert abs(s[key][name] - want[name]) < 1e-12
    assert load_stats(layers[1].counts_E)["dead"] == 1
    summary = summarize(stats)
    assert summary["dead_experts"] == 3


def test_one_transfer_per_read(monkeypatch):
    calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(t.shape) or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append("item"))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda t: calls.append("float"))
    layer_stats(_layers())
    assert len(calls) == 1


# ---- collapse check ------------------------------------------------------------------------
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mhc.stats import MAX_DEAD_FRACTION, MAX_DOMAIN_SHARE, collapse_reasons  # noqa: E402


def _stats_of(counts_E: torch.Tensor, G: int) -> list[dict]:
    zero = torch.zeros(())
    return layer_stats([FFNAux(zero, zero, counts_E, counts_E.view(G, -1).sum(1))])


def test_the_reported_collapse_is_caught():
    """The issue's progressive run: 16 experts per layer, 4 domains, every token in one
    domain (48 of 64 experts dead over 4 layers)."""
    counts = torch.zeros(16, dtype=torch.long)
    counts[12:] = torch.tensor([900, 700, 500, 300])
    reasons = collapse_reasons(_stats_of(counts, 4) * 4)
    assert len(reasons) == 8
    assert "12 of 16 experts dead" in reasons[0] and "domain 3 takes 100.0%" in reasons[1]


def test_balanced_routing_passes_and_a_dense_layer_is_skipped():
    zero = torch.zeros(())
    counts = torch.tensor([100, 90, 0, 80, 120, 95, 105, 85, 99, 101, 110, 97])  # one dead
    assert collapse_reasons(_stats_of(counts, 3) + layer_stats([FFNAux(zero, zero)])) == []


_LOADS = st.lists(st.one_of(st.just(0), st.integers(1, 40)), min_size=12, max_size=12)


@given(_LOADS, st.sampled_from([2, 3, 4]))
@example([0] * 8 + [5, 6, 7, 8], 3)  # one domain takes everything: both reasons
@example([0, 0, 0, 0, 3, 4, 5, 6, 7, 8, 9, 10], 2)  # dead experts, domains still shared
@example([1] * 12, 4)  # healthy
def test_collapse_iff_a_threshold_is_crossed(loads, G):
    """Half the draws are idle experts, so collapsed and healthy layers both occur."""
    counts = torch.tensor(loads)
    dead = sum(v == 0 for v in loads)
    groups = [sum(loads[g * (12 // G):(g + 1) * (12 // G)]) for g in range(G)]
    share = max(groups) / sum(groups) if sum(groups) else 0.0
    want = int(dead > MAX_DEAD_FRACTION * 12) + int(share > MAX_DOMAIN_SHARE)
    assert len(collapse_reasons(_stats_of(counts, G))) == want
