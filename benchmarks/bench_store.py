"""Trace store benchmark: scoped search latency and recall, ingest, reopen, vs chromadb.

Sections (each prints a table; all rows are appended to ``results/bench_store.jsonl`` with
hardware, versions and git sha):

1. **scale** - N random 384-d unit vectors (precomputed text embeddings) over S sessions in
   NS namespaces, ingested in batches; then session-scoped top-10 search (p50/p99 latency,
   recall@10 against an exact numpy scan of the generated vectors, not of the store),
   namespace-wide and "sessions before S" searches through the ANN index, reopen time
   (open + first search with the saved index).
2. **kinds** - a smaller store per index kind (flat, ivf, hnsw): namespace-wide top-10
   latency and recall@10 against exact.
3. **chromadb** - the same 20k traces in chromadb and in the store, 1,000 session-filtered
   top-10 queries each (both return ids, documents and metadata); per-query latency ratio.

    python benchmarks/bench_store.py            # full: 1M traces (~10 min, ~8 GB RAM)
    python benchmarks/bench_store.py --quick    # smoke run: 50k traces
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import append_result, environment  # noqa: E402
from memory_store import IndexConfig, Scope, Trace, TraceStore  # noqa: E402


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def pct(a, q):
    return float(np.percentile(np.asarray(a) * 1e3, q))


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(g[g >= 0].tolist()) & set(e.tolist())) / len(e)
                          for g, e in zip(got, exact, strict=True)]))


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


def section_scale(args, work: Path, rng) -> list[dict]:
    lay = Layout(args.n, args.sessions, args.namespaces)
    d = args.dim
    print(f"generating {args.n:,} x {d} vectors ...", flush=True)
    vecs = unit_rows(rng, args.n, d)
    cfg = IndexConfig(kind=args.kind, nprobe=args.nprobe)
    path = work / "scale"
    batch = args.batch
    add_s = 0.0
    t_all = time.perf_counter()
    with TraceStore.open(path, index=cfg) as store:
        for start in range(0, args.n, batch):
            stop = min(start + batch, args.n)
            traces = [Trace(lay.ns(i // lay.per_session), f"s{i // lay.per_session}", f"t{i}",
                            step=i % lay.per_session, text_embedding=vecs[i])
                      for i in range(start, stop)]
            t0 = time.perf_counter()
            store.add(traces)
            add_s += time.perf_counter() - t0
            if (start // batch) % 20 == 0:
                print(f"  ingested {stop:,} ({stop / max(add_s, 1e-9):,.0f} traces/s in add)",
                      flush=True)
        t0 = time.perf_counter()
    close_s = time.perf_counter() - t0
    wall_s = time.perf_counter() - t_all
    t0 = time.perf_counter()
    store = TraceStore.open(path, mode="r")
    q0 = unit_rows(rng, 1, d)
    store.search_vectors(q0, Scope("ns0", ("s0",)), 10, space="text")
    reopen_s = time.perf_counter() - t0
    rows = [{"section": "scale", "metric": "ingest", "traces": args.n, "batch": batch,
             "add_seconds": add_s, "traces_per_s_add": args.n / add_s,
             "close_seconds": close_s, "wall_seconds": wall_s,
             "traces_per_s_wall_incl_index_build": args.n / wall_s},
            {"section": "scale", "metric": "reopen", "seconds": reopen_s}]
    # session-scoped top-10. Queries are drawn first and the exact answers computed after
    # the timed loop, so the benchmark's own numpy work does not interleave with the store's
    # (BLAS and OpenMP thread pools spinning against each other distort timings on 2 cores).
    sess = rng.integers(args.sessions, size=args.queries)
    qs = unit_rows(rng, args.queries, d)
    lat, got = [], []
    for s, q in zip(sess.tolist(), qs, strict=True):
        scope = Scope(lay.ns(s), (f"s{s}",))
        t0 = time.perf_counter()
        _, ids = store.search_vectors(q, scope, 10, space="text")
        lat.append(time.perf_counter() - t0)
        got.append(ids[0])
    exact = []
    for s, q in zip(sess.tolist(), qs, strict=True):
        sl = lay.rows_of_session(s)
        exact.append(np.argsort(-(vecs[sl] @ q))[:10] + sl.start + 1)  # ids: 1-based rows
    rows.append({"section": "scale", "metric": "session_top10", "queries": args.queries,
                 "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                 "mean_ms": float(np.mean(lat) * 1e3),
                 "recall@10": recall(np.array(got), np.array(exact))})
    # the same through search() (records fetched: what a person or the CLI gets)
    lat = []
    for s, q in zip(sess.tolist()[:300], qs[:300], strict=False):
        t0 = time.perf_counter()
        store.search(q, Scope(lay.ns(s), (f"s{s}",)), 10, mode="dense")
        lat.append(time.perf_counter() - t0)
    rows.append({"section": "scale", "metric": "session_top10_with_records",
                 "queries": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)})
    # wider scopes: whole namespace and "before S" (ANN index with an in-search selector)
    nss = rng.integers(args.namespaces, size=args.wide_queries)
    qs = unit_rows(rng, args.wide_queries, d)
    for label in ("namespace_top10", "before_half_top10", "namespace_top10_exact"):
        lat, got, spans = [], [], []
        for nsi, q in zip(nss.tolist(), qs, strict=True):
            first = nsi * lay.per_ns
            if label.startswith("namespace_top10"):
                scope, last = Scope(f"ns{nsi}"), first + lay.per_ns
            else:
                last = first + lay.per_ns // 2
                scope = Scope(f"ns{nsi}", before=f"s{last}")
            t0 = time.perf_counter()
            _, ids = store.search_vectors(q, scope, 10, space="text",
                                          exact=label.endswith("exact"))
            lat.append(time.perf_counter() - t0)
            got.append(ids[0])
            spans.append((first * lay.per_session, last * lay.per_session))
        exact = [np.argsort(-(vecs[lo:hi] @ q))[:10] + lo + 1
                 for (lo, hi), q in zip(spans, qs, strict=True)]
        rows.append({"section": "scale", "metric": label,
                     "kind": "flat (exact)" if label.endswith("exact") else args.kind,
                     "nprobe": args.nprobe, "scope_rows": spans[0][1] - spans[0][0],
                     "queries": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                     "recall@10": recall(np.array(got), np.array(exact))})
    store.close()
    del vecs
    shutil.rmtree(path, ignore_errors=True)
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
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--queries", type=int, default=1000, help="session-scoped queries")
    ap.add_argument("--wide-queries", type=int, default=200,
                    help="namespace-wide / before-S queries")
    ap.add_argument("--kinds", default="flat,ivf,hnsw")
    ap.add_argument("--kinds-n", type=int, default=50_000)
    ap.add_argument("--chroma-n", type=int, default=20_000)
    ap.add_argument("--chroma-sessions", type=int, default=20)
    ap.add_argument("--chroma-queries", type=int, default=1000)
    ap.add_argument("--sections", default="scale,kinds,chromadb")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch directory (default: a temporary directory)")
    ap.add_argument("--no-save", action="store_true", help="do not append to results/")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.sessions, args.namespaces = 50_000, 100, 5
        args.queries, args.wide_queries, args.kinds_n = 300, 50, 10_000
        args.chroma_n, args.chroma_queries = 5_000, 200
    rng = np.random.default_rng(0)
    env = environment()
    print(f"bench_store on {env['cpu']} ({env['cores']} cores, {env['mem_gib']} GiB), "
          f"git {env['git_sha']}")
    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    work = Path(tmp.name)
    all_rows = []
    sections = {"scale": section_scale, "kinds": section_kinds, "chromadb": section_chroma}
    for name in args.sections.split(","):
        print(f"== {name}", flush=True)
        rows = sections[name](args, work, rng)
        print_rows(rows)
        all_rows += rows
    tmp.cleanup()
    if not args.no_save:
        for r in all_rows:
            path = append_result("bench_store", {"quick": args.quick, **r})
        print(f"appended {len(all_rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
