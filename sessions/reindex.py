"""``engram traces reindex``: recompute Engram latent keys and values from stored text.

Latent keys depend on the weights that made them (stale keys are a known failure of memory
models). Every trace keeps its text, and Engram's traces are a function of text and backbone
(``EngramModel.encode_traces``), so a new checkpoint can re-key a whole store: for each trace
that has a latent key, re-encode its bytes, then replace key, value and ``model_version``
(plus salience) in one store transaction per batch. Traces without latent keys are skipped.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from engram.backends import retrieval_key
from engram.model import model_version
from memory_store.store import TraceStore
from sessions.pipeline import load_model


@torch.no_grad()
def reindex_store(store_dir: Path, checkpoint: Path, batch_size: int = 64,
                  progress: bool = True) -> dict:
    model, _ = load_model(checkpoint)
    model.eval()
    if not model.memory_enabled:
        raise ValueError(f"{checkpoint}: the model has no memory module to make keys with")
    version = model_version(model)
    seq_len = model.backbone.cfg.seq_len
    done = skipped = 0
    with TraceStore.open(store_dir, create=False) as store:
        ids = [i for ns in store.namespaces() for info in store.sessions(ns)
               for i in store._members(ns, info.session)]
        bar = tqdm(total=len(ids), disable=not progress, desc="reindex")
        for start in range(0, len(ids), batch_size):
            traces = [t for t in store.get(ids[start:start + batch_size])
                      if t.latent_key is not None]
            skipped += min(batch_size, len(ids) - start) - len(traces)
            if traces:
                raw = [t.text.encode("utf-8")[-seq_len:] for t in traces]
                width = max(len(r) for r in raw)
                idx = torch.zeros(len(raw), width, dtype=torch.long)
                mask = torch.zeros(len(raw), width, dtype=torch.bool)
                for j, r in enumerate(raw):  # padded after the text, as the runner writes
                    idx[j, :len(r)] = torch.tensor(list(r))
                    mask[j, :len(r)] = True
                tr = model.encode_traces(idx, mask)
                valid = [int(n) for n in tr.mask_NS.sum(1).tolist()]
                store.update_latents(  # one transaction for the whole batch
                    [t.id for t in traces],
                    retrieval_key(tr.key_NK, tr.salience_N if model.cfg.salience_in_read
                                  else None).float().numpy(),
                    [tr.hidden_NSD[j, -n:].float().numpy() for j, n in enumerate(valid)],
                    [{"model_version": version, "salience": float(tr.salience_N[j]),
                      "tokens": n, "bytes": tr.tokens_NS[j, -n:].tolist()}
                     for j, n in enumerate(valid)])
                done += len(traces)
            bar.update(min(batch_size, len(ids) - start))
        bar.close()
        store.flush()
    return {"reindexed": done, "skipped_without_latent": skipped, "model_version": version}
