"""Stale keys: traces written by one model are re-keyed from their stored text by
``engram traces reindex`` with another checkpoint. (``engram run`` through a real store and
``engram traces --run``: tests/sessions/test_platform.py.)"""


import numpy as np
import torch

from engram.backends import retrieval_key, retrieval_query
from engram.config import EngramConfig
from engram.model import EngramModel, model_version
from memory_store import Trace
from memory_store.store import TraceStore
from mhc import presets
from sessions import reindex
from sessions.reindex import reindex_store


class FixedEmbedder:
    dim = 4

    def encode(self, texts):
        return np.full((len(texts), 4), 0.5, dtype=np.float32)


def _model(seed):
    run = presets.load("debug", ["model.seq_len=48"])
    torch.manual_seed(seed)
    cfg = EngramConfig(enabled=True, key_dim=16, value_dim=32, heads=2)
    return EngramModel(run.model, cfg).eval(), run


def test_reindex_recomputes_keys_from_text(tmp_path, monkeypatch):
    """Traces of different lengths (so batches are padded) re-keyed in batches of 2: each
    batch is one store transaction, and every trace gets exactly the key and value that
    encoding its text alone with the new model gives."""
    old, _ = _model(0)
    new, _ = _model(1)
    monkeypatch.setattr(reindex, "load_model", lambda folder: (new, None))
    texts = ["the code for locker QX is 4829.", "ferry late.", "a",
             "the ferry to oslo left late on day 3, and the captain said nothing at all.",
             "tea at five"]
    seq_len = new.backbone.cfg.seq_len  # the long text is cut to its last seq_len bytes
    with torch.no_grad():
        written = [old.encode_traces(torch.tensor([list(t.encode()[-seq_len:])])) for t in texts]
    with TraceStore.open(tmp_path / "store", embedder=FixedEmbedder()) as store:
        ids = store.add([Trace("ns", f"s{j % 2}", t, step=j,
                               latent_key=retrieval_key(w.key_NK, w.salience_N)[0].numpy(),
                               latent_value=w.hidden_NSD[0].numpy(),
                               meta={"model_version": model_version(old)})
                         for j, (t, w) in enumerate(zip(texts, written, strict=True))])
        store.add([Trace("ns", "s0", "a note without latents")])
        generation = store.generation
    result = reindex_store(tmp_path / "store", tmp_path / "new-checkpoint", batch_size=2,
                           progress=False)
    assert result == {"reindexed": 5, "skipped_without_latent": 1,
                      "model_version": model_version(new)}
    with TraceStore.open(tmp_path / "store", mode="r", embedder=FixedEmbedder()) as store:
        assert store.generation == generation + 3  # 5 traces in batches of 2: 3 commits
        assert store.verify().ok
        for t, text in zip(store.get(ids), texts, strict=True):
            with torch.no_grad():
                alone = new.encode_traces(torch.tensor([list(text.encode()[-seq_len:])]))
            n = int(alone.mask_NS[0].sum())
            assert t.meta["model_version"] == model_version(new) and t.meta["tokens"] == n
            assert t.meta["bytes"] == list(text.encode()[-seq_len:])[-n:]
            np.testing.assert_allclose(t.latent_key, retrieval_key(
                alone.key_NK, alone.salience_N)[0].numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(t.latent_value, alone.hidden_NSD[0, -n:].numpy(),
                                       rtol=1e-4, atol=1e-5)
        q = retrieval_query(new.encode_traces(torch.tensor([list(texts[0].encode())])).key_NK)
        _, hits = store.search_latent(q.detach().numpy(), {"namespace": "ns"}, k=1, exact=True)
        assert hits[0, 0] == ids[0]  # the new key finds its own trace first
