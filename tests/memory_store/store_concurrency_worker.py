"""Worker processes for the many-readers test (``test_store_concurrency.py``).

    python store_concurrency_worker.py writer STORE N NAMESPACE   # ingest N traces, batches of 1000
    python store_concurrency_worker.py reader STORE SEED          # query until STORE/../done exists
    python store_concurrency_worker.py follow STORE COUNT         # search until COUNT traces

Trace ``step`` j of a namespace has text ``f"{ns} step {j} word{j % 97}"``, so any process can
check that a hit it got is a whole, committed trace. A reader prints one JSON line at the end:
queries, errors, the ids it saw, the trace counts it observed and whether they ever went down.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from memory_store import Scope, Trace, TraceStore

DIM = 8
TDIM = 16


def text_of(ns: str, j: int) -> str:
    return f"{ns} step {j} word{j % 97}"


def vectors(ns: str, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([len(ns), int(j[0])])
    return (rng.normal(size=(len(j), DIM)).astype(np.float32),
            rng.normal(size=(len(j), TDIM)).astype(np.float32))


def writer(path: str, n: int, ns: str) -> None:
    with TraceStore.open(path, latent_dim=DIM, wait_for_lock=120) as store:
        print("writing", flush=True)
        for start in range(0, n, 1000):
            j = np.arange(start, min(n, start + 1000))
            lk, te = vectors(ns, j)
            store.add([Trace(ns, f"s{int(x) // 5000}", text_of(ns, int(x)), step=int(x),
                             latent_key=lk[r], text_embedding=te[r])
                       for r, x in enumerate(j)])


def reader(path: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    done = os.path.join(os.path.dirname(path), "done")
    while not os.path.exists(os.path.join(path, "store.json")):
        time.sleep(0.01)
    seen: set[int] = set()
    queries = errors = 0
    last_len, went_down, counts = 0, False, set()
    messages = []
    with TraceStore.open(path, mode="r") as store:
        while not os.path.exists(done) or queries < 20:
            try:
                n = len(store)
                went_down |= n < last_len
                last_len = n
                counts.add(n)
                if "big" not in store.namespaces():
                    continue
                q = rng.normal(size=(2, DIM)).astype(np.float32)
                _, ids = store.search_latent(q, Scope("big"), k=10, exact=bool(queries % 2))
                got = [int(i) for i in ids.ravel() if i >= 0]
                hits = []
                if queries % 3 == 0:
                    hits = store.search(rng.normal(size=TDIM).astype(np.float32), "big", k=5,
                                        mode="dense")
                if queries % 25 == 0:
                    hits += store.search(f"word{rng.integers(97)}", "big", k=5, mode="lexical")
                for t in store.get(got):
                    if t.text != text_of(t.namespace, t.step):
                        raise AssertionError(f"torn trace {t.id}: {t.text!r}")
                for h in hits:
                    if h.text != text_of(h.namespace, h.step):
                        raise AssertionError(f"torn hit {h.trace_id}: {h.text!r}")
                    got.append(h.trace_id)
                seen.update(got)
                queries += 1
            except Exception as e:  # counted and reported, the test fails on any
                errors += 1
                messages.append(repr(e))
                if errors > 5:
                    break
    print(json.dumps({"queries": queries, "errors": errors, "messages": messages[:5],
                      "seen": sorted(seen), "went_down": went_down,
                      "counts": sorted(counts)}), flush=True)


def follow(path: str, count: int) -> None:
    """A reader left open across the writer's compact: it must see the writes after it."""
    with TraceStore.open(path, mode="r") as store:
        print("open", len(store), flush=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, ids = store.search_latent(np.ones((1, DIM), np.float32), Scope("big"), k=5,
                                         exact=True)
            if len(store) == count and (ids >= 0).all():
                print("saw", count, flush=True)
                return
            time.sleep(0.02)
    print("timeout", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1] == "follow":
        follow(sys.argv[2], int(sys.argv[3]))
    else:
        reader(sys.argv[2], int(sys.argv[3]))
