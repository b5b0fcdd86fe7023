"""Trace store benchmark: scoped search latency and recall, ingest, deletes, reopen, vs chromadb.

Sections (each prints a table; all rows are appended to ``results/bench_store.jsonl`` with
hardware, versions and git sha; every search row names the path it took, from the index's
own counters: ``exact``, ``exact-filtered``, ``ivf``, ``hnsw``):

1. **scale** - N 384-d unit vectors (precomputed text embeddings; ``--data clustered``: a
   mixture of 2,000 Gaussian clusters, the structure real embeddings have; ``uniform``: no
   structure, the worst case for ANN) over S sessions in NS namespaces, ingested in batches
   with external ids and ``happened_at`` (what users pass); then session-scoped top-10 search
   (p50/p99 latency, recall@10 against an exact numpy scan of the generated vectors, not of the
   store), namespace-wide and "sessions before S" searches large enough for the ANN path (an
   nprobe sweep), a time-window search, and reopen time (open + first search).
2. **locomo** (with ``--locomo``) - the LoCoMo dev conversations added to the N-trace store:
   evidence recall@10 and per-question hybrid search latency at that scale.
3. **forget** - on the scale store: ``delete`` of 10,000 random ids, repeated (median of the
   repeats), the first search after each delete, recall against exact over what remains, then
   ``compact`` (bytes before/after).
4. **kinds** - a smaller store per index kind (flat, ivf, hnsw): namespace-wide top-10
   latency and recall@10 against exact.
5. **chromadb** - the same 20k traces in chromadb and in the store, 1,000 session-filtered
   top-10 queries each (both return ids, documents and metadata); per-query latency ratio.

    python benchmarks/bench_store.py            # full: 1M traces (~15 min, ~8 GB RAM)
    python benchmarks/bench_store.py --quick    # smoke run: 50k traces
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import append_result, environment  # noqa: E402
from memory_store import IndexConfig, Scope, Trace, TraceStore  # noqa: E402

T0 = 1.7e9  # happened_at of trace i is T0 + i seconds


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class Vectors:
    """Unit vectors: uniform on the sphere, or a mixture of Gaussian clusters."""

    def __init__(self, kind: str, d: int, seed: int = 0, clusters: int = 2000,
                 spread: float = 0.6):
        self.kind, self.d = kind, d
        rng = np.random.default_rng(seed)
        self.centers = unit_rows(rng, clusters, d) if kind == "clustered" else None
        self.spread = spread

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.centers is None:
            return unit_rows(rng, n, self.d)
        x = self.centers[rng.integers(len(self.centers), size=n)]
        x = x + rng.standard_normal((n, self.d), dtype=np.float32) * (self.spread /
                                                                     np.sqrt(self.d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)


def pct(a, q):
    return float(np.percentile(np.asarray(a) * 1e3, q))


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(g[g >= 0].tolist()) & set(e.tolist())) / len(e)
                          for g, e in zip(got, exact, strict=True)]))


def paths(store: TraceStore, before: Counter) -> str:
    """The search paths taken since ``before`` (e.g. ``ivf`` or ``exact``)."""
    now = store.search_paths("text")
    used = {k: now[k] - before.get(k, 0) for k in now if now[k] > before.get(k, 0)}
    return "+".join(sorted(used)) or "none"


class Layout:
    """Trace i belongs to session i // per_session; sessions are grouped into namespaces."""

    def __init__(self, n: int, sessions: int, namespaces: int):
        self.n, self.sessions, self.namespaces = n, sessions, namespaces
        self.per_session = n // sessions
        self.per_ns = sessions // namespaces

    def ns(self, s: int) -> str:
        return f"ns{s // self.per_ns}"

    def rows_of_session(self, s: int) -> slice:
        return slice(s * self.per_session, (s + 1) * self.per_session)


def timed_queries(store, qs, scopes, **kw):
    """(latencies, ids, path) of one search_vectors call per query."""
    before = store.search_paths("text")
    lat, got = [], []
    for q, scope in zip(qs, scopes, strict=True):
        t0 = time.perf_counter()
        _, ids = store.search_vectors(q, scope, 10, space="text", **kw)
        lat.append(time.perf_counter() - t0)
        got.append(ids[0])
    return lat, np.array(got), paths(store, before)


def section_scale(args, work: Path, rng, state: dict) -> list[dict]:
    lay = Layout(args.n, args.sessions, args.namespaces)
    d = args.dim
    print(f"generating {args.n:,} x {d} {args.data} vectors ...", flush=True)
    gen = Vectors(args.data, d)
    vecs = gen.draw(rng, args.n)
    cfg = IndexConfig(kind=args.kind, nprobe=args.nprobe, exact_max_rows=args.exact_max_rows,
                      ann_min_rows=args.exact_max_rows)
    path = work / "scale"
    batch = args.batch
    add_s, per_batch = 0.0, []
    t_all = time.perf_counter()
    with TraceStore.open(path, index=cfg) as store:
        for start in range(0, args.n, batch):
            stop = min(start + batch, args.n)
            traces = [Trace(lay.ns(i // lay.per_session), f"s{i // lay.per_session}", f"t{i}",
                            step=i % lay.per_session, text_embedding=vecs[i],
                            external_id=f"s{i // lay.per_session}/{i % lay.per_session}",
                            happened_at=T0 + i)
                      for i in range(start, stop)]
            t0 = time.perf_counter()
            store.add(traces)
            dt = time.perf_counter() - t0
            add_s += dt
            per_batch.append((stop - start) / dt)
            if (start // batch) % 20 == 0:
                print(f"  ingested {stop:,} ({stop / max(add_s, 1e-9):,.0f} traces/s in add)",
                      flush=True)
        t0 = time.perf_counter()
    close_s = time.perf_counter() - t0
    wall_s = time.perf_counter() - t_all
    t0 = time.perf_counter()
    store = TraceStore.open(path, mode="r")
    q0 = gen.draw(rng, 1)
    store.search_vectors(q0, Scope("ns0", ("s0",)), 10, space="text")
    reopen_s = time.perf_counter() - t0
    rows = [{"section": "scale", "metric": "ingest", "data": args.data, "traces": args.n,
             "batch": batch, "with": "external_id+happened_at", "add_seconds": add_s,
             "traces_per_s_add": args.n / add_s,
             "traces_per_s_add_median_batch": float(np.median(per_batch)),
             "close_seconds": close_s, "wall_seconds": wall_s,
             "traces_per_s_wall_incl_index_build": args.n / wall_s},
            {"section": "scale", "metric": "reopen", "seconds": reopen_s}]
    # session-scoped top-10. Queries are drawn first and the exact answers computed after
    # the timed loop, so the benchmark's own numpy work does not interleave with the store's
    # (BLAS and OpenMP thread pools spinning against each other distort timings on 2 cores).
    sess = rng.integers(args.sessions, size=args.queries)
    qs = gen.draw(rng, args.queries)
    lat, got, used = timed_queries(store, qs, [Scope(lay.ns(s), (f"s{s}",)) for s in
                                               sess.tolist()])
    exact = []
    for s, q in zip(sess.tolist(), qs, strict=True):
        sl = lay.rows_of_session(s)
        exact.append(np.argsort(-(vecs[sl] @ q))[:10] + sl.start + 1)  # ids: 1-based rows
    rows.append({"section": "scale", "metric": "session_top10", "path": used,
                 "scope_rows": lay.per_session, "queries": args.queries,
                 "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                 "mean_ms": float(np.mean(lat) * 1e3),
                 "recall@10": recall(got, np.array(exact))})
    # the same through search() (records fetched: what a person or the CLI gets)
    lat = []
    for s, q in zip(sess.tolist()[:300], qs[:300], strict=False):
        t0 = time.perf_counter()
        store.search(q, Scope(lay.ns(s), (f"s{s}",)), 10, mode="dense")
        lat.append(time.perf_counter() - t0)
    rows.append({"section": "scale", "metric": "session_top10_with_records", "path": "exact",
                 "queries": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)})
    rows += wide_rows(args, store, gen, vecs, lay, rng)
    state.update(store=store, vecs=vecs, lay=lay, gen=gen, path=path)
    return rows


def wide_rows(args, store, gen, vecs, lay, rng, label_suffix="") -> list[dict]:
    """Namespace-wide, "before S" and time-window top-10: scopes of 50k-100k rows, above
    ``exact_max_rows``, so the ANN path runs (and exact, for reference)."""
    rows = []
    nss = rng.integers(args.namespaces, size=args.wide_queries)
    qs = gen.draw(rng, args.wide_queries)
    per_ns_rows = lay.per_ns * lay.per_session
    cases = [("namespace_top10", {"nprobe": p}) for p in args.nprobe_sweep] + [
        ("namespace_top10_exact", {"exact": True}), ("before_half_top10", {}),
        ("window_quarter_top10", {})]
    for label, kw in cases:
        scopes, spans = [], []
        for nsi in nss.tolist():
            first = nsi * per_ns_rows
            if label.startswith("namespace"):
                scopes.append(Scope(f"ns{nsi}"))
                spans.append((first, first + per_ns_rows))
            elif label.startswith("before"):
                half = nsi * lay.per_ns + lay.per_ns // 2
                scopes.append(Scope(f"ns{nsi}", before=f"s{half}"))
                spans.append((first, first + per_ns_rows // 2))
            else:  # happened_at window: the second quarter of the namespace's traces
                lo, hi = first + per_ns_rows // 4, first + per_ns_rows // 2
                scopes.append(Scope(f"ns{nsi}", since=T0 + lo, until=T0 + hi - 1))
                spans.append((lo, hi))
        lat, got, used = timed_queries(store, qs, scopes, **kw)
        alive = state_alive(store)
        exact = []
        for (lo, hi), q in zip(spans, qs, strict=True):
            ids = np.arange(lo, hi) + 1
            keep = alive(ids)
            exact.append(ids[keep][np.argsort(-(vecs[lo:hi][keep] @ q))[:10]])
        rows.append({"section": "scale", "metric": label + label_suffix, "path": used,
                     "kind": "flat (exact)" if kw.get("exact") else args.kind,
                     "nprobe": kw.get("nprobe", args.nprobe), "scope_rows": spans[0][1] -
                     spans[0][0], "queries": len(lat), "p50_ms": pct(lat, 50),
                     "p99_ms": pct(lat, 99), "recall@10": recall(got, exact)})
    return rows


def state_alive(store):
    """A membership test of live ids (after deletes the exact answer skips deleted rows)."""
    ix = store._index("text")
    live = np.sort(ix.scope_ids([k for k in set(ix.slices) | set(ix.delta_counts)]))

    def alive(ids):
        pos = np.minimum(np.searchsorted(live, ids), len(live) - 1)
        return live[pos] == ids
    return alive


def section_locomo(args, work: Path, rng, state: dict) -> list[dict]:
    """LoCoMo dev conversations inside the scale store (it must be open for writing)."""
    from benchmarks import locomo_retrieval as lr

    state["store"].close()
    convs = lr.load_conversations(args.locomo_data)
    row = lr.run(convs, state["path"], ["hybrid"], args.wide_queries * 5, save=False,
                 data_name=Path(args.locomo_data).name)
    state["store"] = TraceStore.open(state["path"], mode="r")
    res = row["results"]["hybrid"]
    return [{"section": "locomo", "metric": "hybrid_at_scale", "store_traces": row["traces"],
             "conversations": len(convs), "recall@10": res["overall"]["recall@10"],
             "per_category_recall@10": {c: r["recall@10"] for c, r in res.items()
                                        if isinstance(r, dict) and "recall@10" in r},
             "p50_ms": res["latency"]["p50_ms"], "p99_ms": res["latency"]["p99_ms"],
             "embed_ms_per_question": row["embed_ms_per_question"]}]


def section_forget(args, work: Path, rng, state: dict) -> list[dict]:
    """Bulk deletes of 10,000 ids on the scale store, then compact."""
    state["store"].close()
    path, lay = state["path"], state["lay"]
    rows = []
    store = TraceStore.open(path)
    q = state["gen"].draw(rng, 1)
    store.search_vectors(q, Scope("ns0"), 10, space="text")  # indexes loaded, as in use
    ns_rows = lay.per_ns * lay.per_session
    deleted = set()
    times, first_search = [], []
    for r in range(args.delete_repeats):
        nsi = r % args.namespaces
        pool = np.arange(nsi * ns_rows, (nsi + 1) * ns_rows) + 1
        pick = rng.choice(pool[~np.isin(pool, list(deleted))], size=args.delete_n,
                          replace=False)
        t0 = time.perf_counter()
        n = store.delete(pick.tolist())
        times.append(time.perf_counter() - t0)
        assert n == args.delete_n
        deleted.update(pick.tolist())
        t0 = time.perf_counter()
        _, ids = store.search_vectors(q, Scope(f"ns{nsi}"), 10, space="text")
        first_search.append(time.perf_counter() - t0)
        assert not set(ids[0].tolist()) & deleted
    rows.append({"section": "forget", "metric": "delete_10k_ids", "traces": args.n,
                 "ids_per_delete": args.delete_n, "repeats": len(times),
                 "seconds": [round(t, 4) for t in times],
                 "median_seconds": float(np.median(times)),
                 "first_search_after_ms": [round(t * 1e3, 2) for t in first_search]})
    rows += wide_rows(args, store, state["gen"], state["vecs"], lay, rng, "_after_delete")[:1]
    t0 = time.perf_counter()
    res = store.compact()
    rows.append({"section": "forget", "metric": "compact", "seconds": time.perf_counter() - t0,
                 "deleted": len(deleted), **res})
    store.close()
    state["store"] = TraceStore.open(path, mode="r")
    return rows


def section_kinds(args, work: Path, rng) -> list[dict]:
    rows = []
    n, d = args.kinds_n, args.dim
    vecs = unit_rows(rng, n, d)
    qs = unit_rows(rng, args.wide_queries, d)
    exact = np.argsort(-(qs @ vecs.T), axis=1)[:, :10] + 1
    for kind in args.kinds.split(","):
        cfg = IndexConfig(kind=kind, exact_max_rows=1000, ann_min_rows=1000)
        path = work / f"kind-{kind}"
        with TraceStore.open(path, index=cfg) as store:
            for s in range(0, n, 10_000):
                store.add([Trace("ns", f"s{i // 1000}", f"t{i}", text_embedding=vecs[i])
                           for i in range(s, min(n, s + 10_000))])
            t0 = time.perf_counter()
            store.flush()
            build_s = time.perf_counter() - t0
            params = [{}] if kind == "flat" else (
                [{"nprobe": p} for p in (8, 32, 64)] if kind == "ivf" else
                [{"ef_search": e} for e in (32, 128, 256)])
            for p in params:
                lat, got = [], []
                for q in qs:
                    t0 = time.perf_counter()
                    _, ids = store.search_vectors(q, "ns", 10, space="text", **p)
                    lat.append(time.perf_counter() - t0)
                    got.append(ids[0])
                rows.append({"section": "kinds", "kind": kind, "traces": n, **p,
                             "index_build_s": build_s, "p50_ms": pct(lat, 50),
                             "p99_ms": pct(lat, 99),
                             "recall@10": recall(np.array(got), exact)})
        shutil.rmtree(path, ignore_errors=True)
    return rows


def section_chroma(args, work: Path, rng) -> list[dict]:
    try:
        import chromadb
    except ImportError:
        print("chromadb not installed (pip install -e .[bench]); skipping the comparison")
        return []
    n, d, n_sess = args.chroma_n, args.dim, args.chroma_sessions
    vecs = unit_rows(rng, n, d)
    sess = [f"s{i % n_sess}" for i in range(n)]
    texts = [f"trace number {i}" for i in range(n)]
    queries = [(unit_rows(rng, 1, d)[0], f"s{int(rng.integers(n_sess))}")
               for _ in range(args.chroma_queries)]
    client = chromadb.PersistentClient(path=str(work / "chroma"))
    col = client.create_collection("traces", metadata={"hnsw:space": "ip"})
    t0 = time.perf_counter()
    for s in range(0, n, 5000):
        col.add(ids=[str(i) for i in range(s, min(n, s + 5000))],
                embeddings=vecs[s:s + 5000], documents=texts[s:s + 5000],
                metadatas=[{"session": x} for x in sess[s:s + 5000]])
    chroma_ingest = time.perf_counter() - t0
    lat_c = []
    for q, s in queries:
        t0 = time.perf_counter()
        col.query(query_embeddings=[q], n_results=10, where={"session": s},
                  include=["documents", "metadatas", "distances"])
        lat_c.append(time.perf_counter() - t0)
    path = work / "chroma-vs-store"
    with TraceStore.open(path) as store:
        t0 = time.perf_counter()
        store.add([Trace("ns", sess[i], texts[i], text_embedding=vecs[i]) for i in range(n)])
        store_ingest = time.perf_counter() - t0
    lat_s = []
    with TraceStore.open(path, mode="r") as store:
        for q, s in queries:
            t0 = time.perf_counter()
            store.search(q, Scope("ns", (s,)), 10, mode="dense")
            lat_s.append(time.perf_counter() - t0)
    mean_c, mean_s = float(np.mean(lat_c)) * 1e3, float(np.mean(lat_s)) * 1e3
    return [{"section": "chromadb", "traces": n, "sessions": n_sess,
             "queries": len(queries), "chromadb_ingest_s": chroma_ingest,
             "store_ingest_s": store_ingest, "chromadb_mean_ms": mean_c,
             "chromadb_p50_ms": pct(lat_c, 50), "store_mean_ms": mean_s,
             "store_p50_ms": pct(lat_s, 50), "speedup_mean": mean_c / mean_s,
             "speedup_p50": pct(lat_c, 50) / pct(lat_s, 50)}]


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()]
        print("  " + "  ".join(items))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke sizes (50k traces)")
    ap.add_argument("--n", type=int, default=1_000_000, help="traces in the scale section")
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--namespaces", type=int, default=10)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--batch", type=int, default=10_000, help="traces per add() call")
    ap.add_argument("--kind", default="ivf", choices=["flat", "ivf", "hnsw"],
                    help="index kind of the scale store")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--exact-max-rows", type=int, default=20_000,
                    help="scopes above this many rows take the ANN path (IndexConfig)")
    ap.add_argument("--nprobe-sweep", default="8,16,32",
                    help="nprobe values of the namespace-wide ANN rows")
    ap.add_argument("--data", default="clustered", choices=["clustered", "uniform"],
                    help="vectors of the scale store")
    ap.add_argument("--locomo", action="store_true",
                    help="also run the LoCoMo dev conversations inside the scale store")
    ap.add_argument("--locomo-data", type=Path,
                    default=ROOT.parent / "shared/data/locomo_dev")
    ap.add_argument("--delete-n", type=int, default=10_000, help="ids per bulk delete")
    ap.add_argument("--delete-repeats", type=int, default=5)
    ap.add_argument("--queries", type=int, default=1000, help="session-scoped queries")
    ap.add_argument("--wide-queries", type=int, default=200,
                    help="namespace-wide / before-S queries")
    ap.add_argument("--kinds", default="flat,ivf,hnsw")
    ap.add_argument("--kinds-n", type=int, default=50_000)
    ap.add_argument("--chroma-n", type=int, default=20_000)
    ap.add_argument("--chroma-sessions", type=int, default=20)
    ap.add_argument("--chroma-queries", type=int, default=1000)
    ap.add_argument("--sections", default="scale,locomo,forget,kinds,chromadb",
                    help="sections to run (locomo also needs --locomo; locomo and forget "
                    "need scale)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch directory (default: a temporary directory)")
    ap.add_argument("--no-save", action="store_true", help="do not append to results/")
    args = ap.parse_args(argv)
    args.nprobe_sweep = [int(x) for x in args.nprobe_sweep.split(",")]
    if args.quick:
        args.n, args.sessions, args.namespaces = 50_000, 100, 2
        args.queries, args.wide_queries, args.kinds_n = 300, 50, 10_000
        args.chroma_n, args.chroma_queries = 5_000, 200
        args.delete_n, args.delete_repeats, args.exact_max_rows = 2_000, 3, 10_000
    rng = np.random.default_rng(0)
    env = environment()
    print(f"bench_store on {env['cpu']} ({env['cores']} cores, {env['mem_gib']} GiB), "
          f"git {env['git_sha']}")
    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    work = Path(tmp.name)
    all_rows = []
    state: dict = {}
    sections = {"scale": section_scale, "locomo": section_locomo, "forget": section_forget,
                "kinds": lambda a, w, r, _: section_kinds(a, w, r),
                "chromadb": lambda a, w, r, _: section_chroma(a, w, r)}
    for name in args.sections.split(","):
        if (name == "locomo" and not args.locomo) or (name in ("locomo", "forget")
                                                       and "store" not in state):
            continue
        print(f"== {name}", flush=True)
        rows = sections[name](args, work, rng, state)
        print_rows(rows)
        all_rows += rows
    if "store" in state:
        state["store"].close()
    tmp.cleanup()
    if not args.no_save:
        for r in all_rows:
            path = append_result("bench_store", {"quick": args.quick, **r})
        print(f"appended {len(all_rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
