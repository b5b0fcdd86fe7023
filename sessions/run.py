"""Multi-session recall through the persistent store (``engram run``).

Each episode is a namespace in a real ``TraceStore`` (LMDB + FAISS): session ``s1`` encodes its
segments and writes the traces the write policy keeps; session ``s2`` asks the question and
reads from the store (scope: its namespace, sessions before ``s2``). The traces stay in the
store afterwards, for ``engram traces query|show|export`` and for later runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from engram.model import EngramModel
from engram.store_memory import StoreMemory
from engram.write import select
from memory_store.store import TraceStore
from sessions.memory_train import answer_logits, model_version
from sessions.tasks.recall import RecallTask

SESSIONS = ["s1", "s2"]


@torch.no_grad()
def run_store_episodes(model: EngramModel, store_dir: Path, episodes: int, memory: str = "on",
                       policy: str | None = None, batch_size: int = 20, prefix: str = "recall",
                       seed: int = 0, progress: bool = True) -> dict:
    """Write session 1 of each episode to the store, answer session 2 reading from it."""
    model.eval()
    task = RecallTask(split="eval", seed=seed)
    version = model_version(model) if model.memory_enabled else "none"
    correct = written = 0
    began = time.perf_counter()
    latent_dim = model.cfg.key_dim + 1 if model.memory_enabled else None  # + salience prior
    with TraceStore.open(store_dir, latent_dim=latent_dim) as store:
        for start in tqdm(range(0, episodes, batch_size), disable=not progress, desc="episodes"):
            batch = task.batch(start, min(batch_size, episodes - start))
            B, N, S = batch.write_BNS.shape
            mem = None
            if memory == "on":
                names = [f"{prefix}-{seed}-{start + b}" for b in range(B)]
                mem = StoreMemory(store, names, SESSIONS, version)
                tr = model.encode_traces(batch.write_BNS.reshape(B * N, S))
                sal = tr.salience_N.view(B, N)
                keep = torch.stack([select(sal[b], model.cfg, policy) for b in range(B)])
                mem.write(tr.key_NK.view(B, N, -1), tr.hidden_NSD.view(B, N, S, -1),
                          tr.mask_NS.view(B, N, S), tr.tokens_NS.view(B, N, S), sal, session=0,
                          keep_Bn=keep)
                written += int((keep & batch.asked_BN).any(-1).sum())
            res = model(batch.question_BS, memory=mem, session=1)  # mem is None unless "on"
            pred = answer_logits(res.out.logits, batch).argmax(-1)
            tgt = batch.targets_BS.gather(1, batch.answer_pos_B4)
            correct += int((pred == tgt).all(-1).sum())
        store.flush()
        stats = {"traces_in_store": len(store)}
    return {"episodes": episodes, "memory": memory, "accuracy": correct / episodes,
            "asked_fact_written": written / episodes if memory == "on" else 0.0,
            "seconds": time.perf_counter() - began, "model_version": version, **stats}
