"""LoCoMo evidence retrieval through the trace store (dense, lexical, hybrid).

Each LoCoMo conversation becomes a namespace, each of its sessions a session, each turn a
trace (text; a shared image adds ``[shares <caption>]``; external id ``<sample>/<dia_id>``;
``happened_at`` the session's date; meta: speaker, session date/time text, dia_id). Every
question is searched in its conversation, all sessions in scope (the questions come after the
conversation). Reported per category and overall: evidence recall@1/5/10 (the fraction of a
question's evidence turns among the top k) and nDCG@10 (binary relevance), and the search
latency per question: p50/p99 of ``store.search`` with the question's embedding computed
beforehand (the store's search cost) and the time MiniLM takes to embed a question.
Questions whose evidence list is empty after normalisation are skipped (and counted).

    python benchmarks/locomo_retrieval.py [--data ../shared/data/locomo_dev/] [--modes ...]

The store runs with its default configuration; ``default`` marks the store's default mode.
Only the five dev conversations may be used for tuning (see ``../shared/data/README.md``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import append_result  # noqa: E402
from memory_store import Scope, Trace, TraceStore  # noqa: E402
from memory_store.embedder import default_embedder  # noqa: E402

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop",
              5: "adversarial"}
KS = (1, 5, 10)


def normalize_evidence(evidence: list) -> list[str]:
    """'D8:6; D9:17' -> ['D8:6', 'D9:17'], 'D:11:26' -> ['D11:26'], 'D' -> []."""
    out: list[str] = []
    for e in evidence:
        for part in re.split(r"[;,\s]+", str(e)):
            m = re.fullmatch(r"D:?(\d+):(\d+)", part.strip())
            if m:
                d = f"D{int(m.group(1))}:{int(m.group(2))}"
                if d not in out:
                    out.append(d)
    return out


def load_conversations(data: Path) -> list[dict]:
    files = sorted(data.glob("*.json")) if data.is_dir() else [data]
    convs = []
    for f in files:
        convs.extend(json.loads(f.read_text()))
    return convs


def session_time(text: str) -> str | None:
    """LoCoMo's '1:56 pm on 8 May, 2023' as ISO 8601 ('2023-05-08T13:56:00'), or None."""
    try:
        return dt.datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y").isoformat()
    except ValueError:
        return None


def conversation_traces(conv: dict) -> list[Trace]:
    c = conv["conversation"]
    names = sorted((k for k in c if re.fullmatch(r"session_\d+", k)),
                   key=lambda k: int(k.split("_")[1]))
    out = []
    for name in names:
        when = c.get(f"{name}_date_time", "")
        for step, turn in enumerate(c[name]):
            text = turn["text"]
            if turn.get("blip_caption"):
                text += f" [shares {turn['blip_caption']}]"
            out.append(Trace(conv["sample_id"], name, text, step=step,
                             external_id=f"{conv['sample_id']}/{turn['dia_id']}",
                             happened_at=session_time(when),
                             meta={"speaker": turn["speaker"], "time": when,
                                   "dia_id": turn["dia_id"]}))
    return out


class CachedEmbedder:
    """The store's embedder, with question embeddings computed once beforehand (so a timed
    search measures the store, not MiniLM)."""

    def __init__(self, inner, texts: list[str]):
        self.inner, self.dim, self.name = inner, inner.dim, inner.name
        t0 = time.perf_counter()
        vecs = inner.encode(texts) if texts else np.zeros((0, inner.dim), np.float32)
        self.seconds_per_text = (time.perf_counter() - t0) / max(len(texts), 1)
        self.cache = dict(zip(texts, vecs, strict=True))

    def encode(self, texts: list[str]) -> np.ndarray:
        miss = [t for t in texts if t not in self.cache]
        if miss:
            self.cache.update(zip(miss, self.inner.encode(miss), strict=True))
        return np.stack([self.cache[t] for t in texts])


def latency(store: TraceStore, convs: list[dict], mode: str, limit: int) -> dict:
    """p50/p99 ms of single-question ``search`` calls (question embeddings cached)."""
    lat = []
    for conv in convs:
        for q in conv["qa"][: max(1, limit // len(convs))]:
            t0 = time.perf_counter()
            store.search(q["question"], Scope(conv["sample_id"]), k=max(KS), mode=mode)
            lat.append(time.perf_counter() - t0)
    return {"queries": len(lat), "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3)}


def ndcg(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if d in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / ideal if ideal else 0.0


def evaluate(store: TraceStore, convs: list[dict], mode: str) -> dict:
    per_cat: dict[str, dict[str, list[float]]] = {}
    for conv in convs:
        qa = [(q, normalize_evidence(q.get("evidence", []))) for q in conv["qa"]]
        qa = [(q, ev) for q, ev in qa if ev]
        hits = store.search_batch([q["question"] for q, _ in qa], Scope(conv["sample_id"]),
                                  k=max(KS), mode=mode)
        for (q, ev), hs in zip(qa, hits, strict=False):
            ranked = [h.meta["dia_id"] for h in hs]
            rel = set(ev)
            row = {f"recall@{k}": len(rel & set(ranked[:k])) / len(rel) for k in KS}
            row["ndcg@10"] = ndcg(ranked, rel)
            for cat in (CATEGORIES.get(q["category"], str(q["category"])), "overall"):
                d = per_cat.setdefault(cat, {})
                for name, v in row.items():
                    d.setdefault(name, []).append(v)
    return {cat: {"n": len(d["ndcg@10"]), **{m: sum(v) / len(v) for m, v in d.items()}}
            for cat, d in per_cat.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/locomo_dev",
                    help="LoCoMo JSON file or directory (default: ../shared/data/locomo_dev/)")
    ap.add_argument("--modes", default="dense,lexical,hybrid",
                    help="comma-separated text modes to evaluate")
    ap.add_argument("--store", type=Path, default=None,
                    help="store directory to (re)build (default: a temporary directory)")
    ap.add_argument("--latency-queries", type=int, default=500,
                    help="single-question searches timed per mode")
    ap.add_argument("--no-save", action="store_true", help="do not append to results/")
    args = ap.parse_args(argv)
    convs = load_conversations(args.data)
    run(convs, args.store, args.modes.split(","), args.latency_queries,
        save=not args.no_save, data_name=Path(args.data).name)
    return 0


def run(convs: list[dict], store_dir: Path | None, modes: list[str], latency_queries: int,
        save: bool, data_name: str, open_kw: dict | None = None) -> dict:
    """Ingest ``convs`` into the store at ``store_dir`` (a temporary one when None), evaluate
    ``modes``, print the table and (with ``save``) append the results row."""
    skipped = sum(1 for c in convs for q in c["qa"]
                  if not normalize_evidence(q.get("evidence", [])))
    tmp = None
    if store_dir is None:
        tmp = tempfile.TemporaryDirectory()
        store_dir = Path(tmp.name) / "store"
    t0 = time.perf_counter()
    questions = sorted({q["question"] for c in convs for q in c["qa"]})
    embedder = CachedEmbedder(default_embedder(), questions)
    with TraceStore.open(store_dir, embedder=embedder, **(open_kw or {})) as store:
        for conv in convs:
            if conv["sample_id"] not in store.namespaces():
                store.add(conversation_traces(conv))
        ingest_s = time.perf_counter() - t0
        default = store.text_config.default_mode
        results = {}
        for mode in modes:
            t1 = time.perf_counter()
            results[mode] = evaluate(store, convs, mode)
            results[mode]["seconds"] = time.perf_counter() - t1
            results[mode]["latency"] = latency(store, convs, mode, latency_queries)
        n_traces = len(store)
        n_turns = sum(s.count for c in convs for s in store.sessions(c["sample_id"]))
    cats = [c for c in list(CATEGORIES.values()) + ["overall"] if c in next(iter(
        results.values()))]
    print(f"LoCoMo retrieval: {len(convs)} conversations, {n_turns} turns, "
          f"{results[next(iter(results))]['overall']['n']} questions "
          f"({skipped} without usable evidence skipped); ingest+embed {ingest_s:.1f}s; "
          f"{len(convs)} conversations in a store of {n_traces:,} traces")
    print(f"{'mode':16s} {'category':12s} {'n':>4s}  R@1    R@5    R@10   nDCG@10")
    for mode, res in results.items():
        label = mode + (" (default)" if mode == default else "")
        for cat in cats:
            r = res[cat]
            print(f"{label:16s} {cat:12s} {r['n']:4d}  {r['recall@1']:.3f}  {r['recall@5']:.3f}"
                  f"  {r['recall@10']:.3f}  {r['ndcg@10']:.3f}")
            label = ""
    print(f"{'mode':16s} search p50 / p99 per question (ms, question embedding cached; "
          f"MiniLM embeds a question in {embedder.seconds_per_text * 1e3:.1f} ms)")
    for mode, res in results.items():
        lat = res["latency"]
        print(f"{mode:16s} {lat['p50_ms']:.2f} / {lat['p99_ms']:.2f}  ({lat['queries']} queries)")
    row = {"data": data_name, "conversations": [c["sample_id"] for c in convs],
           "turns": n_turns, "traces": n_traces, "skipped_questions": skipped,
           "default_mode": default,
           "ingest_seconds": ingest_s, "embed_ms_per_question": embedder.seconds_per_text * 1e3,
           "results": results}
    if save:
        path = append_result("locomo_retrieval", row)
        print(f"appended to {path}")
    if tmp is not None:
        tmp.cleanup()
    return row


if __name__ == "__main__":
    sys.exit(main())
