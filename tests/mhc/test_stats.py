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
