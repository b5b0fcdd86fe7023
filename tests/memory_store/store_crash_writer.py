"""Writer process for the SIGKILL crash test: adds batches forever, printing acknowledged ids.

Usage: python store_crash_writer.py STORE SEED. Batch b's traces are a pure function of
(SEED, b) (see ``batch``), so the test can regenerate what every acknowledged id must hold.
Every few batches it also flushes the index, updates latent keys or deletes a session, so
kills land in commits, index saves, and non-append writes.
"""

from __future__ import annotations

import sys

import numpy as np

from memory_store import IndexConfig, Trace, TraceStore

DIM = 8
TDIM = 16


def batch(seed: int, b: int) -> list[Trace]:
    rng = np.random.default_rng([seed, b])
    n = int(rng.integers(1, 30))
    return [Trace(namespace=f"ns{rng.integers(2)}", session=f"b{b % 5}", text=f"t{b}-{j}",
                  step=j, latent_key=rng.normal(size=DIM).astype(np.float32),
                  text_embedding=rng.normal(size=TDIM).astype(np.float32),
                  latent_value=np.full((2,), b, np.int32), meta={"b": b, "j": j})
            for j in range(n)]


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    kind = ["flat", "ivf", "hnsw"][seed % 3]
    cfg = IndexConfig(kind=kind, exact_max_rows=50, ann_min_rows=50, nlist=4, hnsw_m=8,
                      ef_construction=20)
    store = TraceStore.open(path, index=cfg, latent_dim=DIM, wait_for_lock=True)
    print("ready", flush=True)
    b = 0
    while True:
        ids = store.add(batch(seed, b))
        print("ack", b, " ".join(map(str, ids.tolist())), flush=True)
        if b % 4 == 3:
            store.flush()
        if b % 7 == 6:
            ids = ids[: max(1, len(ids) // 2)]
            store.update_latent_keys(ids, np.ones((len(ids), DIM), np.float32) * b)
            print("upd", b, " ".join(map(str, ids.tolist())), flush=True)
        if b % 11 == 10:
            n = store.delete_session("ns0", "b0") if "b0" in {
                s.session for s in store.sessions("ns0")} else -1
            print("del", b, n, flush=True)
        b += 1


if __name__ == "__main__":
    main()
