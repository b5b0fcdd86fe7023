"""TensorMemory and StoreMemory (a real LMDB + FAISS store) holding the same traces return the
same top-k trace ids for exact search, and a model reading from either gives the same logits
within tolerance; scope is respected by both."""

import numpy as np
import pytest
import torch

from engram.backends import TensorMemory, TraceBatch
from engram.config import EngramConfig
from engram.model import EngramModel
from engram.store_memory import StoreMemory
from memory_store.store import TraceStore
from mhc.config import FFNConfig, ModelConfig


class NoTextEmbedder:
    """These tests search latent space only; a fixed small text embedding keeps them fast.
    (The real MiniLM embedder is exercised by the memory_store tests.)"""

    dim = 8

    def encode(self, texts):
        return np.ones((len(texts), self.dim), dtype=np.float32) / np.sqrt(self.dim)


def _model(seed=0, salience_in_read=True):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=2, seq_len=24,
                      ffn=FFNConfig(hidden=16, n_domains=2, n_components=3, k1=1, k2=2))
    model = EngramModel(cfg, EngramConfig(enabled=True, top_k=3, key_dim=16, value_dim=32,
                                          heads=2, salience_in_read=salience_in_read,
                                          # without the gate in reading, only this trains it
                                          write_distill_coef=0.0 if salience_in_read else 1.0))
    with torch.no_grad():
        for reader in model.readers.values():
            reader.gate_param.fill_(0.5)
    return model.eval()


def _fill(model, store, B=3, n=6, S=24, seed=1, salience_N=None):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(32, 127, (B * n, S), generator=g)
    tr = model.encode_traces(idx)
    sal = tr.salience_N if salience_N is None else salience_N
    batch = TraceBatch(tr.key_NK.view(B, n, -1), tr.hidden_NSD.view(B, n, S, -1),
                       tr.mask_NS.view(B, n, S), tr.tokens_NS.view(B, n, S), sal.view(B, n))
    keep = torch.rand(B, n, generator=g) < 0.7
    prior = model.cfg.salience_in_read
    tensor_mem = TensorMemory(B, 32, model.cfg.key_dim, S, salience_prior=prior)
    tensor_mem.write(batch, session=0, keep_Bn=keep)
    store_mem = StoreMemory(store, [f"ep{b}" for b in range(B)], ["s1", "s2"], "v1",
                            salience_prior=prior)
    ids = store_mem.write(batch, session=0, keep_Bn=keep)
    assert len(ids) == int(keep.sum())
    return tensor_mem, store_mem, keep


@pytest.fixture
def store(tmp_path):
    with TraceStore.open(tmp_path / "store", embedder=NoTextEmbedder()) as s:
        yield s


@pytest.mark.parametrize("salience_in_read", [True, False])
def test_same_topk_ids_for_exact_search(store, salience_in_read):
    model = _model(salience_in_read=salience_in_read)
    tensor_mem, store_mem, keep = _fill(model, store)
    reader = next(iter(model.readers.values()))
    q = reader.query(torch.randn(3, 10, 32))
    a = tensor_mem.retrieve(q, session=1, k=3)
    b = store_mem.retrieve(q, session=1, k=3)
    for row in range(3):
        # the store's ids, in order of slots written for this row
        store_ids = sorted(int(i) for i in b.ids_BM[row] if i >= 0)
        slot_of_store_id = dict(zip(store_ids, keep[row].nonzero().flatten().tolist(),
                                    strict=True))
        for t in range(10):
            tensor_slots = set(a.selected_BTM[row, t].nonzero().flatten().tolist())
            found = {slot_of_store_id[int(i)] for i in store_mem.last_ids[row][t] if i >= 0}
            assert found == tensor_slots
            assert len(found) == min(3, int(keep[row].sum()))


@pytest.mark.parametrize("salience_in_read", [True, False])
def test_model_logits_agree_across_backends(store, salience_in_read):
    model = _model(salience_in_read=salience_in_read)
    tensor_mem, store_mem, _ = _fill(model, store)
    idx = torch.randint(32, 127, (3, 24))
    with torch.no_grad():
        plain = model(idx).out.logits
        a = model(idx, memory=tensor_mem, session=1).out.logits
        b = model(idx, memory=store_mem, session=1).out.logits
    assert not torch.allclose(a, plain, atol=1e-3)  # memory changes the output
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_scope_same_session_and_other_namespaces_invisible(store):
    model = _model()
    _, store_mem, keep = _fill(model, store)
    q = next(iter(model.readers.values())).query(torch.randn(3, 5, 32))
    assert store_mem.retrieve(q, session=0, k=3).n_traces == 0  # nothing before session 0
    cand = store_mem.retrieve(q, session=1, k=3)
    for row in range(3):
        ids = [int(i) for i in cand.ids_BM[row] if i >= 0]
        assert {t.namespace for t in store.get(ids)} == {f"ep{row}"}


def test_stale_model_version_warns_once(store):
    model = _model()
    _, store_mem, _ = _fill(model, store)
    reader_mem = StoreMemory(store, store_mem.namespaces, store_mem.sessions, "v2")
    q = next(iter(model.readers.values())).query(torch.randn(3, 4, 32))
    with pytest.warns(UserWarning, match="stale"):
        reader_mem.retrieve(q, session=1, k=3)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reader_mem.retrieve(q, session=1, k=3)


@pytest.mark.parametrize("salience_in_read", [True, False])
def test_the_gate_enters_reading_only_when_configured(tmp_path, salience_in_read):
    """Same traces, gate logits spread apart: with ``salience_in_read`` the retrieval and
    the logits move (the prior and the value scale read the gate); without it neither does,
    in both backends."""
    model = _model(salience_in_read=salience_in_read)
    n = 3 * 6
    spread = torch.linspace(-6.0, 6.0, n)[torch.randperm(n, generator=torch.Generator()
                                                          .manual_seed(3))]
    idx = torch.randint(32, 127, (3, 24), generator=torch.Generator().manual_seed(4))
    q = next(iter(model.readers.values())).query(torch.randn(3, 10, 32))
    got = {}
    for name, sal in (("zero", torch.zeros(n)), ("spread", spread)):
        with TraceStore.open(tmp_path / name, embedder=NoTextEmbedder()) as st:
            tensor_mem, store_mem, _ = _fill(model, st, salience_N=sal)
            with torch.no_grad():
                got[name] = [(mem.retrieve(q, session=1, k=3).scores_BTM,
                              model(idx, memory=mem, session=1).out.logits)
                             for mem in (tensor_mem, store_mem)]
    for (score_a, logit_a), (score_b, logit_b) in zip(got["zero"], got["spread"], strict=True):
        same_rank = torch.equal(torch.isfinite(score_a), torch.isfinite(score_b))
        same_logits = torch.allclose(logit_a, logit_b, atol=1e-5)
        if salience_in_read:
            assert not same_rank and not same_logits
        else:
            assert same_rank and same_logits
