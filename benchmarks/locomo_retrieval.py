"""LoCoMo evidence retrieval through the trace store (dense, lexical, hybrid).

Each LoCoMo conversation becomes a namespace, each of its sessions a session, each turn a
trace (text; a shared image adds ``[shares <caption>]``; meta: speaker, session date/time,
dia_id). Every question is searched in its conversation, all sessions in scope (the questions
come after the conversation). Reported per category and overall: evidence recall@1/5/10 (the
fraction of a question's evidence turns among the top k) and nDCG@10 (binary relevance).
Questions whose evidence list is empty after normalisation are skipped (and counted).

    python benchmarks/locomo_retrieval.py [--data ../shared/data/locomo_dev/] [--modes ...]

The store runs with its default configuration; ``default`` marks the store's default mode.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import append_result  # noqa: E402
from memory_store import Scope, Trace, TraceStore  # noqa: E402

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
                             meta={"speaker": turn["speaker"], "time": when,
                                   "dia_id": turn["dia_id"]}))
    return out


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
    ap.add_argument("--no-save", action="store_true", help="do not append to results/")
    args = ap.parse_args(argv)
    convs = load_conversations(args.data)
    skipped = sum(1 for c in convs for q in c["qa"]
                  if not normalize_evidence(q.get("evidence", [])))
    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory()
        args.store = Path(tmp.name) / "store"
    t0 = time.perf_counter()
    with TraceStore.open(args.store) as store:
        for conv in convs:
            if conv["sample_id"] not in store.namespaces():
                store.add(conversation_traces(conv))
        ingest_s = time.perf_counter() - t0
        default = store.text_config.default_mode
        results = {}
        for mode in args.modes.split(","):
            t1 = time.perf_counter()
            results[mode] = evaluate(store, convs, mode)
            results[mode]["seconds"] = time.perf_counter() - t1
        n_traces = len(store)
    cats = [c for c in list(CATEGORIES.values()) + ["overall"] if c in next(iter(
        results.values()))]
    print(f"LoCoMo retrieval: {len(convs)} conversations, {n_traces} turns, "
          f"{results[next(iter(results))]['overall']['n']} questions "
          f"({skipped} without usable evidence skipped); ingest+embed {ingest_s:.1f}s")
    print(f"{'mode':16s} {'category':12s} {'n':>4s}  R@1    R@5    R@10   nDCG@10")
    for mode, res in results.items():
        label = mode + (" (default)" if mode == default else "")
        for cat in cats:
            r = res[cat]
            print(f"{label:16s} {cat:12s} {r['n']:4d}  {r['recall@1']:.3f}  {r['recall@5']:.3f}"
                  f"  {r['recall@10']:.3f}  {r['ndcg@10']:.3f}")
            label = ""
    if not args.no_save:
        path = append_result("locomo_retrieval", {
            "data": Path(args.data).name, "conversations": [c["sample_id"] for c in convs],
            "traces": n_traces, "skipped_questions": skipped, "default_mode": default,
            "ingest_seconds": ingest_s, "results": results})
        print(f"appended to {path}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
