"""Parameter accounting from the config equals the module's real parameter count, for every
FFN kind and sharing mode; base sharing saves what it should."""

import itertools

import pytest
import torch

from mhc import params
from mhc.config import FFN_KINDS, SHARING_MODES, FFNConfig, ModelConfig
from mhc.model import MHCModel


def _cfg(kind, sharing, tie=True):
    ffn = FFNConfig(kind=kind, hidden=24, n_domains=3, n_components=5, k1=2, k2=2,
                    sharing=sharing, lowrank_rank=4, segment_len=8)
    return ModelConfig(d_model=32, n_layers=2, n_heads=4, seq_len=16, tie_weights=tie, ffn=ffn)


@pytest.mark.parametrize("kind,sharing,tie",
                         list(itertools.product(FFN_KINDS, SHARING_MODES, [True, False])))
def test_total_matches_module(kind, sharing, tie):
    cfg = _cfg(kind, sharing, tie)
    model = MHCModel(cfg)
    actual = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    assert params.count(cfg).total == actual


@pytest.mark.parametrize("kind", [k for k in FFN_KINDS if k != "dense"])
def test_active_matches_parameters_touched_per_token(kind):
    """Active FFN params per token = router + K experts' weights: check against the real
    expert tensors of one expert."""
    cfg = _cfg(kind, "none")
    ffn = MHCModel(cfg).blocks[0].ffn
    one_expert = sum(p[0].numel() for p in ffn.experts.parameters())
    router = ffn.router.weight_DR.numel()
    assert params.ffn_params(cfg.d_model, cfg.ffn)[1] == router + cfg.ffn.top_k * one_expert


def test_dense_has_equal_active_ffn_params_to_moe_experts():
    moe, dense = _cfg("hierarchical", "none"), _cfg("dense", "none")
    router = moe.d_model * (moe.ffn.n_domains + moe.ffn.n_experts)
    assert params.ffn_params(32, moe.ffn)[1] - router == params.ffn_params(32, dense.ffn)[1]


def test_base_sharing_saving_is_reported():
    cfg = _cfg("hierarchical", "base")
    saving = params.sharing_saving(cfg)
    G, C, d, F = 3, 5, 32, 24
    # gate and up: E matrices become C matrices, in every layer
    assert saving["saved"] == cfg.n_layers * 2 * (G * C - C) * d * F
    unshared = MHCModel(_cfg("hierarchical", "none"))
    assert saving["unshared"] == sum(p.numel() for p in unshared.parameters())
    assert 0 < saving["saved_fraction"] < 1


def test_lowrank_starts_equal_to_base():
    torch.manual_seed(0)
    base = MHCModel(_cfg("hierarchical", "base"))
    low = MHCModel(_cfg("hierarchical", "lowrank"))
    low.load_state_dict(base.state_dict(), strict=False)
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(base(idx).logits, low(idx).logits)
