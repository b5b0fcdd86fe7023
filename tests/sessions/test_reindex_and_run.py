"""Stale keys: traces written by one model are re-keyed from their stored text by
``engram traces reindex`` with another checkpoint; ``engram run`` drives episodes through a
real store; ``engram traces`` reaches the store CLI."""

import json
import warnings

import numpy as np
import torch

from engram.backends import retrieval_query
from engram.config import EngramConfig
from engram.model import EngramModel
from engram.store_memory import StoreMemory
from memory_store.store import TraceStore
from mhc import presets
from sessions import cli
from sessions.memory_train import model_version, save_memory_model
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


def test_reindex_recomputes_keys_from_text(tmp_path):
    old, run = _model(0)
    new, _ = _model(1)
    save_memory_model(tmp_path / "new", new, run, step=1)
    texts = ["the code for locker QX is 4829.", "the ferry to oslo left late on day 3."]
    idx = torch.tensor([list(t.encode()) for t in texts[:1]] + [list(texts[1].encode()[:31])])
    with torch.no_grad():
        tr = old.encode_traces(idx)
    with TraceStore.open(tmp_path / "store", embedder=FixedEmbedder()) as store:
        mem = StoreMemory(store, ["ns"], ["s1", "s2"], model_version(old))
        ids = mem.write(tr.key_NK[None], tr.hidden_NSD[None], tr.mask_NS[None], tr.tokens_NS[None],
                        tr.salience_N[None], session=0)
    result = reindex_store(tmp_path / "store", tmp_path / "new", progress=False)
    assert result["reindexed"] == 2 and result["model_version"] == model_version(new)
    with torch.no_grad():
        expected = new.encode_traces(idx)
    with TraceStore.open(tmp_path / "store", mode="r", embedder=FixedEmbedder()) as store:
        assert store.verify().ok
        for j, t in enumerate(store.get(ids)):
            assert t.meta["model_version"] == model_version(new)
            np.testing.assert_allclose(store.latent_values([t.id])[0],
                                       expected.hidden_NSD[j].numpy(), rtol=1e-5, atol=1e-6)
        q = retrieval_query(expected.key_NK).numpy()
        _, hits = store.search_latent(q, {"namespace": "ns"}, k=1, exact=True)
        assert hits[:, 0].tolist() == list(ids)  # each new key finds its own trace first
        reader = StoreMemory(store, ["ns"], ["s1", "s2"], model_version(new))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no stale-version warning any more
            reader.retrieve(expected.key_NK[None], session=1, k=2)


def test_cli_ablate_run_and_traces(tmp_path, capsys):
    out = tmp_path / "abl"
    assert cli.main(["ablate", "debug", "model.seq_len=48", "--minutes", "0", "--steps", "3",
                     "--eval-episodes", "4", "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "ablation.json").read_text())
    row = summary["seeds"][0]
    assert row["steps"] == 3 and set(row) >= {"no-memory", "trained-off", "on (learned 30%)",
                                              "on (random 30%)", "on (write all)"}
    capsys.readouterr()
    store = tmp_path / "store"
    assert cli.main(["run", "--checkpoint", str(out / "checkpoint"), "--store", str(store),
                     "--episodes", "3", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["episodes"] == 3 and res["traces_in_store"] == 3 * 3  # 30% of 10 segments
    assert cli.main(["traces", "list", "--store", str(store), "--json"]) == 0
    listed = capsys.readouterr().out
    assert "recall-0-0" in listed
    assert cli.main(["traces", "verify", "--store", str(store)]) == 0
    assert cli.main(["traces", "show", "--store", str(tmp_path / "missing"), "1"]) == 2
