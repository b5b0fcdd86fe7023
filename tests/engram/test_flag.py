"""The feature flag: memory absent == plain mHC (parameters and bit-identical logits);
trained-off == memory gate at zero; an empty memory is harmless; the env/CLI flag."""

import pytest
import torch

from engram.backends import TensorMemory, TraceBatch
from engram.config import EngramConfig, env_enabled, resolve
from engram.model import EngramModel
from mhc.config import FFNConfig, ModelConfig
from mhc.model import MHCModel


def _cfg():
    return ModelConfig(d_model=32, n_layers=3, n_heads=2, seq_len=24,
                       ffn=FFNConfig(hidden=16, n_domains=2, n_components=3, k1=1, k2=2))


def _memory(model, B, n=5, S=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (B * n, S), generator=g)
    tr = model.encode_traces(idx)
    mem = TensorMemory(B, 32, model.cfg.key_dim, S)
    mem.write(TraceBatch(tr.key_NK.view(B, n, -1), tr.hidden_NSD.view(B, n, S, -1),
                         tr.mask_NS.view(B, n, S), tr.tokens_NS.view(B, n, S),
                         tr.salience_N.view(B, n)), session=0)
    return mem


def test_disabled_is_exactly_plain_mhc():
    torch.manual_seed(7)
    plain = MHCModel(_cfg())
    torch.manual_seed(7)
    wrapped = EngramModel(_cfg(), EngramConfig(enabled=False))
    assert sum(p.numel() for p in wrapped.parameters()) == sum(
        p.numel() for p in plain.parameters())
    assert not hasattr(wrapped, "readers") and not hasattr(wrapped, "writer")
    idx = torch.randint(0, 256, (3, 24))
    assert torch.equal(wrapped(idx).out.logits, plain(idx).logits)
    # a memory handed to a disabled model is ignored
    assert torch.equal(wrapped(idx, memory=object(), session=1).out.logits, plain(idx).logits)


def test_enabled_backbone_init_matches_plain():
    torch.manual_seed(3)
    plain = MHCModel(_cfg())
    torch.manual_seed(3)
    on = EngramModel(_cfg(), EngramConfig(enabled=True))
    for (k, v), (k2, v2) in zip(plain.state_dict().items(), on.backbone.state_dict().items(),
                                strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_trained_off_equals_zero_gate():
    torch.manual_seed(0)
    model = EngramModel(_cfg(), EngramConfig(enabled=True, read_layers=[1, 2]))
    idx = torch.randint(0, 256, (2, 24))
    mem = _memory(model, 2)
    on = model(idx, memory=mem, session=1).out.logits
    model.cfg.read = False
    off = model(idx, memory=mem, session=1).out.logits
    assert not torch.allclose(on, off), "with a non-zero gate the read must matter"
    model.cfg.read = True
    with torch.no_grad():
        for reader in model.readers.values():
            reader.gate_param.zero_()
    zero_gate = model(idx, memory=mem, session=1).out.logits
    assert torch.equal(zero_gate, off)


def _scramble(model):
    """Every memory parameter moved far from its init, as training would move it."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("backbone."):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def test_empty_memory_is_exactly_harmless_after_training():
    torch.manual_seed(0)
    model = EngramModel(_cfg(), EngramConfig(enabled=True))
    _scramble(model)
    idx = torch.randint(0, 256, (2, 24))
    plain = model(idx).out.logits
    empty = TensorMemory(2, 32, model.cfg.key_dim, 24)
    assert torch.equal(model(idx, memory=empty, session=1).out.logits, plain)
    # memory from the reader's own or later session is out of scope: also no effect at all
    mem = _memory(model, 2)
    assert torch.equal(model(idx, memory=mem, session=0).out.logits, plain)
    # ... while an in-scope memory does change the output
    assert not torch.allclose(model(idx, memory=mem, session=1).out.logits, plain)


def test_gradients_reach_query_key_value_and_gates():
    torch.manual_seed(0)
    model = EngramModel(_cfg(), EngramConfig(enabled=True))
    idx = torch.randint(0, 256, (2, 24))
    mem = _memory(model, 2, n=6)
    mem.session_BM[:, 3:] = 1  # traces of two sessions: ages 1 and 2 for a reader in session 2
    res = model(idx, idx, memory=mem, session=2)
    (res.out.loss + model.writer.salience_loss(mem.salience_BM)).backward()
    reader = next(iter(model.readers.values()))
    for name, p in [("query/key", reader.token_key.weight), ("value", reader.token_value.weight),
                    ("retrieval", reader.retrieval_query.weight), ("gate", reader.gate_param),
                    ("recency", reader.recency),
                    ("trace key", model.writer.key_proj.weight),
                    ("salience", model.writer.salience.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_flag_resolution(monkeypatch):
    monkeypatch.delenv("ENGRAM_ENABLED", raising=False)
    assert EngramConfig().enabled is False
    assert env_enabled(False) is False
    monkeypatch.setenv("ENGRAM_ENABLED", "1")
    assert resolve(EngramConfig()).enabled is True
    monkeypatch.setenv("ENGRAM_ENABLED", "0")
    assert resolve(EngramConfig(enabled=True)).enabled is False
    monkeypatch.setenv("ENGRAM_ENABLED", "maybe")
    with pytest.raises(ValueError, match="ENGRAM_ENABLED"):
        resolve(EngramConfig())
    assert resolve(EngramConfig(), "trained-off").enabled is True
    assert resolve(EngramConfig(), "trained-off").read is False
    assert resolve(EngramConfig(enabled=True), "off").enabled is False


@pytest.mark.parametrize("kwargs,field", [
    (dict(top_k=0), "top_k"), (dict(key_dim=30, heads=4), "heads"),
    (dict(write_policy="most"), "write_policy"), (dict(write_budget=2.0), "write_budget"),
    (dict(gate_init=1.0), "gate_init"), (dict(read_layers=[]), "read_layers"),
    (dict(salience_in_read=False), "salience_in_read"),  # the gate would learn nothing
])
def test_bad_engram_config(kwargs, field):
    with pytest.raises(ValueError, match=f"EngramConfig.{field}"):
        EngramConfig(**kwargs)


def test_read_layer_out_of_range():
    with pytest.raises(ValueError, match="read_layers"):
        EngramModel(_cfg(), EngramConfig(enabled=True, read_layers=[5]))


def test_generation_cache_matches_fresh_projection_and_tracks_weights():
    torch.manual_seed(0)
    model = EngramModel(_cfg(), EngramConfig(enabled=True)).eval()
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        mem = _memory(model, 2)
        first = model(idx, memory=mem, session=1).out.logits
        cached = model(idx, memory=mem, session=1).out.logits  # projections from the cache
        assert torch.equal(first, cached)
        for reader in model.readers.values():
            reader.token_value.weight.mul_(2.0)  # in place: the cache must notice
        changed = model(idx, memory=mem, session=1).out.logits
    with torch.enable_grad():
        fresh = model(idx, memory=mem, session=1).out.logits  # autograd path: no cache
    assert not torch.allclose(changed, first)
    torch.testing.assert_close(changed, fresh)


def test_without_null_slot_an_unretrieved_token_reads_zeros():
    torch.manual_seed(0)
    model = EngramModel(_cfg(), EngramConfig(enabled=True, null_kv=False))
    _scramble(model)
    idx = torch.randint(0, 256, (2, 24))
    empty = TensorMemory(2, 32, model.cfg.key_dim, 24)
    torch.testing.assert_close(model(idx, memory=empty, session=1).out.logits,
                               model(idx).out.logits)
    mem = _memory(model, 2)
    out = model(idx, memory=mem, session=1).out.logits
    assert torch.isfinite(out).all() and not torch.allclose(out, model(idx).out.logits)


def test_retrieval_distillation_trains_the_retriever_and_stays_finite():
    torch.manual_seed(0)
    model = EngramModel(_cfg(), EngramConfig(enabled=True))
    idx = torch.randint(0, 256, (2, 24))
    mem = _memory(model, 2)
    # row 0 reads as session 1 (sees the traces), row 1 as session 0 (nothing eligible)
    res = model(idx, memory=mem, session=torch.tensor([1, 0]), top_k=mem.size)
    loss = next(iter(res.reads.values())).retrieval_loss
    assert loss is not None and torch.isfinite(loss) and loss > 0
    loss.backward()
    reader = next(iter(model.readers.values()))
    for name, p in [("retrieval query", reader.retrieval_query.weight),
                    ("trace key", model.writer.key_proj.weight),
                    ("scale", reader.log_retrieval_scale)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        assert next(iter(model(idx, memory=mem, session=1).reads.values())).retrieval_loss is None
