"""Recall errors from look-alike names: exact match by distance, split by whether the asked
locker's *reversal* (LJ for JL) was also given a code in an earlier session of the episode.

Reads finished run folders (``RUN/on/probes.jsonl`` and the arm's store ``RUN/on/store``);
prints one markdown table per run, changes nothing. Used for docs/results.md (issue 9)::

    python benchmarks/recall_name_pairs.py runs/recall5 runs/recall5-ablate/seed0
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path

_NAME = re.compile(r"locker ([A-Z]{2})\b")
_CODE = re.compile(r"\d{4}")


def coded_names(store_dir: Path) -> dict[str, list[tuple[str, int]]]:
    """Per namespace: (locker name, session number) of every stored trace that gives a code."""
    from memory_store.store import TraceStore

    buf = io.StringIO()
    with TraceStore.open(store_dir, create=False) as store:
        store.export(buf, with_vectors=False)
    out: dict[str, list[tuple[str, int]]] = {}
    for line in buf.getvalue().splitlines()[1:]:  # the first line is the store's config
        t = json.loads(line)
        m = _NAME.search(t["text"])
        if m and _CODE.search(t["text"]):
            out.setdefault(t["namespace"], []).append((m.group(1), int(t["session"][1:])))
    return out


def table(run: Path) -> dict[int, dict[str, int]]:
    facts = coded_names(run / "on" / "store")
    rows: dict[int, dict[str, int]] = {}
    for line in (run / "on" / "probes.jsonl").read_text().splitlines():
        p = json.loads(line)
        m = _NAME.search(p["prompt"])
        if m is None:
            raise ValueError(f"{run}: probe without a locker name: {p['prompt']!r}")
        name, asked_in = m.group(1), int(p["session"][1:])
        pair = any(n == name[::-1] != name and s < asked_in
                   for n, s in facts.get(p["namespace"], []))
        r = rows.setdefault(int(p["tags"]["distance"]),
                            {"probes": 0, "pair": 0, "pair_exact": 0, "other_exact": 0})
        r["probes"] += 1
        r["pair"] += pair
        r["pair_exact" if pair else "other_exact"] += bool(p["exact"])
    return dict(sorted(rows.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders of recall experiments")
    args = ap.parse_args(argv)
    for run in args.runs:
        if not (run / "on" / "probes.jsonl").exists():
            ap.error(f"{run}: no on/probes.jsonl (a finished recall run with memory on?)")
        print(f"\n{run}\n\n| distance | probes | with a reversal pair | exact (pair) | "
              "exact (others) | exact (all) |\n|---|---|---|---|---|---|")
        for d, r in table(run).items():
            others = r["probes"] - r["pair"]
            print(f"| {d} | {r['probes']} | {r['pair']} | "
                  f"{r['pair_exact'] / max(r['pair'], 1):.3f} | "
                  f"{r['other_exact'] / max(others, 1):.3f} | "
                  f"{(r['pair_exact'] + r['other_exact']) / r['probes']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
