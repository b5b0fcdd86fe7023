"""Command line for trace stores: ``python -m memory_store ...`` and ``engram traces ...``.

``add_traces_subcommands(subparsers)`` registers the subcommands (ingest, query, list, show,
export, stats, verify, delete) on an argparse subparsers object; each sets ``func`` to a
callable taking the parsed args and returning an exit code. ``main(argv)`` is the
stand-alone entry point. Exit codes: 0 ok, 1 verify found problems, 2 a store error (message
on stderr).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from .errors import InvalidInputError, StoreError
from .records import Trace, as_vector, check_name, validate
from .scope import Scope
from .store import TraceStore

INGEST_HELP = """\
Add traces from a JSON-lines file, one object a line:
  {"namespace": "...", "session": "...", "text": "...",
   "trace_id": 123?, "time": ...?, "step": 0?, "meta": {...}?, "latent_key": [...]?}
"time" is stored as meta["time"]. The whole file is checked first: a bad line is reported
with its line number and nothing is written. Text embeddings are computed in batches
(all-MiniLM-L6-v2, offline) with a progress bar; each batch is one atomic commit."""

QUERY_HELP = """\
Search a namespace's traces. Single query: TEXT with --namespace and an optional scope
(--session S ... or --before-session S). Batch: --queries FILE.jsonl with one
{"namespace", "text", "sessions"?, "before_session"?, "id"?} object a line; prints one line
{"id", "results": [{"trace_id", "session", "text", "score"}]} per query (the embedding
model loads once for the batch). Modes: dense (MiniLM), lexical (BM25), hybrid (fusion;
the store's default)."""


def _open(args) -> TraceStore:
    return TraceStore.open(args.store, mode="r")


# ---- ingest ---------------------------------------------------------------------------
def _parse_line(line: str, lineno: int, maxc: int, latent_dim: int | None) -> Trace:
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict):
            raise InvalidInputError("expected a JSON object")
        unknown = set(obj) - {"namespace", "session", "text", "trace_id", "time", "step",
                              "meta", "latent_key"}
        if unknown:
            raise InvalidInputError(f"unknown fields {sorted(unknown)}")
        for f in ("namespace", "session", "text"):
            if f not in obj:
                raise InvalidInputError(f"missing field {f!r}")
        meta = dict(obj.get("meta") or {})
        if obj.get("time") is not None:
            meta["time"] = obj["time"]
        t = Trace(obj["namespace"], obj["session"], obj["text"], step=obj.get("step", 0),
                  meta=meta, id=obj.get("trace_id"),
                  latent_key=None if obj.get("latent_key") is None else as_vector(
                      obj["latent_key"], latent_dim, "latent_key"))
        return validate(t, max_text_chars=maxc, latent_dim=latent_dim, text_dim=None)
    except (ValueError, TypeError) as e:  # StoreError input errors are ValueErrors
        raise InvalidInputError(f"line {lineno}: {e}") from None


def cmd_ingest(args) -> int:
    from tqdm import tqdm

    with TraceStore.open(args.store, create=True, wait_for_lock=args.wait) as store:
        maxc, ld = store.text_config.max_text_chars, store.latent_dim
        traces, seen = [], {}
        with open(args.file) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                t = _parse_line(line, lineno, maxc, ld)
                if ld is None and t.latent_key is not None:
                    ld = len(t.latent_key)
                if t.id is not None:
                    if t.id in seen:
                        raise InvalidInputError(f"line {lineno}: trace_id {t.id} repeats "
                                                f"line {seen[t.id]}")
                    seen[t.id] = lineno
                traces.append(t)
        taken = store._read(lambda txn: [i for i in seen if txn.get(
            i.to_bytes(8, "big"), db=store._db("traces")) is not None])
        if taken:
            raise InvalidInputError(f"line {seen[taken[0]]}: trace_id {taken[0]} already in "
                                    "the store")
        n = 0
        with tqdm(total=len(traces), unit="trace", desc="ingest", disable=args.quiet) as bar:
            for s in range(0, len(traces), args.batch_size):
                ids = store.add(traces[s:s + args.batch_size])
                n += len(ids)
                bar.update(len(ids))
    print(f"ingested {n} traces into {args.store}")
    return 0


# ---- query ----------------------------------------------------------------------------
def _query_scope(obj: dict, lineno: int) -> Scope:
    try:
        return Scope(obj["namespace"], obj.get("sessions"), obj.get("before_session"))
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidInputError(f"line {lineno}: {e}") from None


def cmd_query(args) -> int:
    if (args.queries is None) == (args.text is None):
        raise InvalidInputError("give either TEXT or --queries FILE.jsonl")
    with TraceStore.open(args.store, mode="r") as store:
        if args.queries is None:
            if not args.namespace:
                raise InvalidInputError("--namespace is required with a TEXT query")
            scope = Scope(args.namespace, tuple(args.session) if args.session else None,
                          args.before_session)
            hits = store.search(args.text, scope, k=args.k, mode=args.mode)
            if args.json:
                print(json.dumps({"id": None, "results": [h.to_json() for h in hits]}))
            else:
                print(f"{'#':>3} {'score':>8} {'trace_id':>10}  {'session':16s} text")
                for r, h in enumerate(hits, 1):
                    text = h.text.replace("\n", " ")
                    text = text if len(text) <= 80 else text[:77] + "..."
                    print(f"{r:>3} {h.score:8.4f} {h.trace_id:>10}  {h.session:16s} {text}")
            return 0
        qs, scopes, ids = [], [], []
        with open(args.queries) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise InvalidInputError(f"line {lineno}: {e}") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise InvalidInputError(f"line {lineno}: needs a \"text\" string")
                qs.append(obj["text"])
                scopes.append(_query_scope(obj, lineno))
                ids.append(obj.get("id", lineno))
        results = store.search_batch(qs, scopes, k=args.k, mode=args.mode) if qs else []
        out = open(args.out, "w") if args.out else sys.stdout
        try:
            for qid, hits in zip(ids, results, strict=True):
                out.write(json.dumps({"id": qid, "results": [h.to_json() for h in hits]})
                          + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
    return 0


# ---- inspection -----------------------------------------------------------------------
def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def cmd_list(args) -> int:
    with _open(args) as store:
        if args.namespace:
            rows = [vars(s) for s in store.sessions(args.namespace)]
            if args.json:
                print(json.dumps(rows))
                return 0
            print(f"{'#':>4} {'session':24s} {'traces':>8}  first write (UTC)")
            for s in rows:
                print(f"{s['ordinal']:>4} {s['session']:24s} {s['count']:>8}  "
                      f"{_when(s['first_write'])}")
            return 0
        rows = [{"namespace": ns, "sessions": len(ss), "traces": sum(s.count for s in ss)}
                for ns in store.namespaces() for ss in [store.sessions(ns)]]
        if args.json:
            print(json.dumps(rows))
            return 0
        print(f"{'namespace':32s} {'sessions':>8} {'traces':>10}")
        for r in rows:
            print(f"{r['namespace']:32s} {r['sessions']:>8} {r['traces']:>10}")
    return 0


def cmd_show(args) -> int:
    with _open(args) as store:
        for t in store.get(args.ids):
            if args.json:
                print(json.dumps(t.to_json(with_vectors=True)))
                continue
            print(f"trace {t.id}  {t.namespace}/{t.session}  step {t.step}  "
                  f"created {_when(t.created) if t.created else '-'}")
            print(f"  text: {t.text}")
            print(f"  meta: {json.dumps(t.meta)}")
            for name in ("text_embedding", "latent_key", "latent_value"):
                v = getattr(t, name)
                print(f"  {name}: " + ("-" if v is None else f"{v.dtype} {list(v.shape)}"))
    return 0


def cmd_export(args) -> int:
    with _open(args) as store:
        n = store.export(args.out or sys.stdout, namespace=args.namespace,
                         with_vectors=not args.no_vectors)
    print(f"exported {n} traces", file=sys.stderr)
    return 0


def cmd_stats(args) -> int:
    with _open(args) as store:
        st = store.stats()
    if args.json:
        print(json.dumps(st))
    else:
        for k, v in st.items():
            print(f"{k:16s} {v}")
    return 0


def cmd_verify(args) -> int:
    with _open(args) as store:
        report = store.verify()
    print(report)
    return 0 if report.ok else 1


def cmd_delete(args) -> int:
    check_name("namespace", args.namespace)
    with TraceStore.open(args.store, create=False, wait_for_lock=args.wait) as store:
        if args.session:
            n = store.delete_session(args.namespace, args.session)
            what = f"session {args.namespace}/{args.session}"
        else:
            n = store.delete_namespace(args.namespace)
            what = f"namespace {args.namespace}"
    print(f"deleted {what}: {n} traces")
    return 0


# ---- wiring ---------------------------------------------------------------------------
def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, metavar="DIR", help="trace store directory")


def add_traces_subcommands(subparsers: Any) -> None:
    """Register the trace-store subcommands on ``subparsers`` (argparse)."""
    raw = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("ingest", help="add traces from a JSON-lines file",
                              description=INGEST_HELP, formatter_class=raw)
    _store_arg(p)
    p.add_argument("file", metavar="FILE.jsonl")
    p.add_argument("--batch-size", type=int, default=1000, help="traces per commit")
    p.add_argument("--wait", action="store_true", help="wait for another writer to finish")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ingest)

    p = subparsers.add_parser("query", help="search traces (text, dense/lexical/hybrid)",
                              description=QUERY_HELP, formatter_class=raw)
    _store_arg(p)
    p.add_argument("text", nargs="?", metavar="TEXT", help="query text (single query)")
    p.add_argument("--namespace", help="namespace to search (single query)")
    p.add_argument("--session", action="append", metavar="S",
                   help="restrict to this session (repeatable)")
    p.add_argument("--before-session", metavar="S",
                   help="restrict to sessions written before S")
    p.add_argument("--k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--mode", choices=["dense", "lexical", "hybrid"], default=None,
                   help="retrieval mode (default: the store's, hybrid)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--queries", metavar="FILE.jsonl", help="batch of queries (JSON lines)")
    p.add_argument("--out", metavar="FILE", help="batch results file (default stdout)")
    p.set_defaults(func=cmd_query)

    p = subparsers.add_parser("list", help="list namespaces, or the sessions of one",
                              description="Without --namespace: namespaces with session and "
                              "trace counts. With it: its sessions in first-write order.")
    _store_arg(p)
    p.add_argument("--namespace")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = subparsers.add_parser("show", help="show traces by id",
                              description="Print traces (text, meta, vector shapes); "
                              "--json prints them in full, vectors included.")
    _store_arg(p)
    p.add_argument("ids", nargs="+", type=int, metavar="ID")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = subparsers.add_parser("export", help="export traces as JSON lines",
                              description="Write traces (all, or one namespace) as JSON "
                              "lines that TraceStore.import_ reads back.")
    _store_arg(p)
    p.add_argument("--namespace")
    p.add_argument("--out", metavar="FILE", help="output file (default stdout)")
    p.add_argument("--no-vectors", action="store_true", help="leave out vectors and values")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("stats", help="counts, dims, index config, sizes")
    _store_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = subparsers.add_parser("verify", help="check store consistency (exit 1 on problems)",
                              description="Check LMDB consistency and that every index "
                              "matches LMDB (stale or corrupt indexes are rebuilt in memory "
                              "first). Exit status 1 when problems are found.")
    _store_arg(p)
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("delete", help="delete a session or a whole namespace",
                              description="Delete --session S of --namespace NS, or the whole "
                              "namespace when no --session is given.")
    _store_arg(p)
    p.add_argument("--namespace", required=True)
    p.add_argument("--session")
    p.add_argument("--wait", action="store_true", help="wait for another writer to finish")
    p.set_defaults(func=cmd_delete)


def run(args: argparse.Namespace) -> int:
    """Run a parsed subcommand, turning store errors into a message and exit code 2."""
    try:
        return args.func(args)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memory_store",
                                 description="Administer trace stores (LMDB + FAISS).")
    add_traces_subcommands(ap.add_subparsers(dest="command", required=True,
                                             metavar="COMMAND"))
    return run(ap.parse_args(argv))
