"""Command line for trace stores: ``python -m memory_store ...`` and ``engram traces ...``.

``add_traces_subcommands(subparsers)`` registers the subcommands (ingest, query, list, show,
export, import, stats, verify, delete, compact) on an argparse subparsers object; each sets
``func`` to a callable taking the parsed args and returning an exit code. ``run(args)`` runs
one, turning store errors into a message and exit code 2. ``main(argv)`` is the stand-alone
entry point. Exit codes: 0 ok, 1 verify found problems, 2 a store error (message on stderr).

Examples::

    python -m memory_store ingest --store runs/store turns.jsonl --wait 30
    python -m memory_store query --store runs/store --namespace conv-26 "Where did Jon go?"
    python -m memory_store query --store runs/store --namespace conv-26 --since 2023-06-01 \\
        --until 2023-07-01 --newest-first --hide-superseded "Where did Jon go?"
    python -m memory_store show --store runs/store --namespace conv-26 conv-26/D1:3
    python -m memory_store delete --store runs/store --namespace conv-26 --session session_2
    python -m memory_store export --store runs/store --out dump.jsonl   # + dump.safetensors
    python -m memory_store import --store runs/copy dump.jsonl
    python -m memory_store compact --store runs/store
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from .errors import InvalidInputError, StoreError
from .records import Trace, as_vector, check_name, validate
from .scope import Scope
from .store import TraceStore
from .timefmt import iso
from .transfer import json_objects

FIELDS = {"namespace", "session", "text", "external_id", "trace_id", "happened_at",
          "supersedes", "time", "step", "meta", "latent_key"}

INGEST_HELP = """\
Add traces from a JSON-lines file, one object a line:
  {"namespace": "...", "session": "...", "text": "...",
   "external_id": "your-id"?, "happened_at": "2023-05-08T13:56:00Z"?,
   "supersedes": "an-earlier-external-id"?, "step": 0?, "meta": {...}?,
   "latent_key": [...]?, "time": ...?, "trace_id": 123?}
external_id: your own id (any string up to 256 UTF-8 bytes, unique in its namespace). A line
whose external_id is already in the namespace replaces that trace (an upsert: the version
count goes up), so ingesting the same file twice leaves the same store. happened_at: when it
happened (ISO 8601; without a zone it is UTC). supersedes: the trace this one corrects (an
external id, or an internal trace id). "time" is kept as meta["time"]. trace_id is the
store's own 64-bit id (only for restoring). The whole file is checked first: a bad line is
reported with its line number and field, and nothing is written. Text embeddings are
computed in batches (all-MiniLM-L6-v2, offline) with a progress bar; each batch is one
atomic commit.

  python -m memory_store ingest --store runs/store turns.jsonl --wait 30"""

QUERY_HELP = """\
Search a namespace's traces. Single query: TEXT with --namespace and an optional scope
(--session S ... or --before-session S), a time window (--since/--until, ISO 8601, on
--time-field happened_at|recorded_at), --hide-superseded and --newest-first (equal scores,
newest first). Batch: --queries FILE.jsonl with one {"namespace", "text", "sessions"?,
"before_session"?, "since"?, "until"?, "time_field"?, "hide_superseded"?, "id"?} object a
line; prints one line {"id", "results": [{"trace_id", "external_id", "session", "text",
"score", "happened_at"}]} per query (the embedding model loads once for the batch). Modes:
dense (MiniLM), lexical (BM25), hybrid (fusion; the store's default).

  python -m memory_store query --store runs/store --namespace u1 --since 2023-06-01 "trip" """


def _open(args) -> TraceStore:
    return TraceStore.open(args.store, mode="r")


def _wait(value: str) -> float:
    try:
        w = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--wait: expected seconds, got {value!r}") from None
    if not w >= 0:
        raise argparse.ArgumentTypeError("--wait: must be >= 0 seconds")
    return w


def _writer(args, create: bool) -> TraceStore:
    return TraceStore.open(args.store, create=create, wait_for_lock=args.wait or False)


# ---- ingest ---------------------------------------------------------------------------
def _parse_line(obj: dict, lineno: int, maxc: int, latent_dim: int | None) -> Trace:
    try:
        unknown = set(obj) - FIELDS
        if unknown:
            raise InvalidInputError(f"unknown fields {sorted(unknown)}")
        for f in ("namespace", "session", "text"):
            if f not in obj:
                raise InvalidInputError(f"{f}: missing", f)
        if isinstance(obj.get("trace_id"), str):
            raise InvalidInputError(
                f"trace_id: {obj['trace_id']!r} is a string; trace_id is the store's own "
                "64-bit id; give your own ids as \"external_id\"", "trace_id")
        meta = dict(obj.get("meta") or {})
        if obj.get("time") is not None:
            meta["time"] = obj["time"]
        t = Trace(obj["namespace"], obj["session"], obj["text"], step=obj.get("step", 0),
                  meta=meta, id=obj.get("trace_id"), external_id=obj.get("external_id"),
                  happened_at=obj.get("happened_at"), supersedes=obj.get("supersedes"),
                  latent_key=None if obj.get("latent_key") is None else as_vector(
                      obj["latent_key"], latent_dim, "latent_key"))
        return validate(t, max_text_chars=maxc, latent_dim=latent_dim, text_dim=None)
    except (ValueError, TypeError) as e:  # StoreError input errors are ValueErrors
        raise InvalidInputError(f"line {lineno}: {e}", getattr(e, "field", None)) from None


def cmd_ingest(args) -> int:
    from tqdm import tqdm

    with _writer(args, create=True) as store:
        maxc, ld = store.text_config.max_text_chars, store.latent_dim
        traces, seen_id, seen_ext = [], {}, {}
        with open(args.file) as f:
            for lineno, obj in json_objects(f):
                t = _parse_line(obj, lineno, maxc, ld)
                if ld is None and t.latent_key is not None:
                    ld = len(t.latent_key)
                checks = [(seen_id, t.id, "trace_id")] if t.id is not None else []
                if t.external_id is not None:
                    checks.append((seen_ext, (t.namespace, t.external_id), "external_id"))
                for seen, key, what in checks:
                    if key in seen:
                        raise InvalidInputError(f"line {lineno}: {what} repeats line "
                                                f"{seen[key]}", what)
                    seen[key] = lineno
                traces.append(t)
        taken = store._read(lambda txn: [i for i in seen_id if txn.get(
            i.to_bytes(8, "big"), db=store._db("traces")) is not None])
        if taken:
            raise InvalidInputError(f"line {seen_id[taken[0]]}: trace_id {taken[0]} already "
                                    "in the store", "trace_id")
        before, n = len(store), 0
        with tqdm(total=len(traces), unit="trace", desc="ingest", disable=args.quiet) as bar:
            for s in range(0, len(traces), args.batch_size):
                ids = store.add(traces[s:s + args.batch_size])
                n += len(ids)
                bar.update(len(ids))
        new = len(store) - before
    print(f"ingested {n} traces into {args.store} ({new} new, {n - new} updated)")
    return 0


# ---- query ----------------------------------------------------------------------------
def _query_scope(obj: dict, lineno: int) -> Scope:
    try:
        return Scope(obj["namespace"], obj.get("sessions"), obj.get("before_session"),
                     obj.get("since"), obj.get("until"), obj.get("time_field", "happened_at"),
                     bool(obj.get("hide_superseded", False)))
    except (KeyError, ValueError, TypeError) as e:
        raise InvalidInputError(f"line {lineno}: {e}", getattr(e, "field", None)) from None


def cmd_query(args) -> int:
    if (args.queries is None) == (args.text is None):
        raise InvalidInputError("give either TEXT or --queries FILE.jsonl")
    params = {"newest_first": True} if args.newest_first else {}
    with TraceStore.open(args.store, mode="r") as store:
        if args.queries is None:
            if not args.namespace:
                raise InvalidInputError("namespace: --namespace is required with a TEXT query",
                                        "namespace")
            scope = Scope(args.namespace, tuple(args.session) if args.session else None,
                          args.before_session, args.since, args.until, args.time_field,
                          args.hide_superseded)
            hits = store.search(args.text, scope, k=args.k, mode=args.mode, **params)
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
            for lineno, obj in json_objects(f):
                if not isinstance(obj.get("text"), str):
                    raise InvalidInputError(f"line {lineno}: needs a \"text\" string", "text")
                qs.append(obj["text"])
                scopes.append(_query_scope(obj, lineno))
                ids.append(obj.get("id", lineno))
        results = store.search_batch(qs, scopes, k=args.k, mode=args.mode, **params) \
            if qs else []
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
def _when(ts: float | None) -> str:
    if ts is None or not math.isfinite(ts):
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _ids(args, store: TraceStore) -> list[int]:
    """Internal ids of args.ids: integers are internal ids unless --external; the rest are
    external ids of --namespace."""
    internal, external = [], []
    for raw in args.ids:
        if not args.external and raw.isdigit():
            internal.append(int(raw))
        else:
            external.append(raw)
    if external and not args.namespace:
        raise InvalidInputError(f"namespace: {external[0]!r} is an external id; give "
                                "--namespace", "namespace")
    resolved = store.resolve(args.namespace, external).tolist() if external else []
    order = iter(resolved)
    return [int(r) if not args.external and r.isdigit() else next(order) for r in args.ids]


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
        for t in store.get(_ids(args, store)):
            if args.json:
                print(json.dumps(t.to_json(with_vectors=True)))
                continue
            ext = f"  external id {t.external_id!r}" if t.external_id is not None else ""
            print(f"trace {t.id}{ext}  {t.namespace}/{t.session}  step {t.step}  "
                  f"version {t.version}")
            print(f"  recorded_at: {iso(t.recorded_at)}  happened_at: {iso(t.happened_at) or '-'}"
                  + (f"  supersedes: {t.supersedes}" if t.supersedes else ""))
            print(f"  text: {t.text}")
            print(f"  meta: {json.dumps(t.meta)}")
            for name in ("text_embedding", "latent_key", "latent_value"):
                v = getattr(t, name)
                print(f"  {name}: " + ("-" if v is None else f"{v.dtype} {list(v.shape)}"))
    return 0


def cmd_export(args) -> int:
    with _open(args) as store:
        ids = _ids(args, store) if args.ids else None
        n = store.export(args.out or sys.stdout, namespace=args.namespace,
                         sessions=args.session, ids=ids,
                         with_vectors=not args.no_vectors and args.out is not None)
    where = args.out or "stdout (no vectors: give --out FILE.jsonl for those)"
    print(f"exported {n} traces to {where}", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    with _writer(args, create=True) as store:
        ids = store.import_(args.file, keep_ids=not args.new_ids)
    print(f"imported {len(ids)} traces into {args.store}")
    return 0


def cmd_stats(args) -> int:
    with _open(args) as store:
        st = store.stats()
    if args.json:
        print(json.dumps(st))
    else:
        for k, v in st.items():
            print(f"{k:20s} {v}")
    return 0


def cmd_verify(args) -> int:
    with _open(args) as store:
        report = store.verify()
    print(report)
    return 0 if report.ok else 1


def cmd_delete(args) -> int:
    check_name("namespace", args.namespace)
    if args.session and args.ids:
        raise InvalidInputError("give --session or IDs, not both")
    with _writer(args, create=False) as store:
        if args.ids:
            n = store.delete(_ids(args, store), namespace=args.namespace)
            what = f"{len(args.ids)} ids of {args.namespace}"
        elif args.session:
            n = store.delete_session(args.namespace, args.session)
            what = f"session {args.namespace}/{args.session}"
        else:
            n = store.delete_namespace(args.namespace)
            what = f"namespace {args.namespace}"
    print(f"deleted {what}: {n} traces")
    return 0


def cmd_compact(args) -> int:
    with _writer(args, create=False) as store:
        res = store.compact()
    print(f"compacted {args.store}: {res['bytes_before']:,} -> {res['bytes_after']:,} bytes")
    return 0


# ---- wiring ---------------------------------------------------------------------------
def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, metavar="DIR", help="trace store directory")


def _wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=_wait, default=0, metavar="SECONDS",
                   help="wait up to SECONDS for another writer to finish (default: fail at "
                   "once)")


def _ids_arg(p: argparse.ArgumentParser, nargs: str) -> None:
    p.add_argument("ids", nargs=nargs, metavar="ID",
                   help="trace ids: integers are internal ids, anything else an external id "
                   "of --namespace")
    p.add_argument("--external", action="store_true",
                   help="treat every ID as an external id (for numeric external ids)")


def add_traces_subcommands(subparsers: Any) -> None:
    """Register the trace-store subcommands on ``subparsers`` (argparse)."""
    raw = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("ingest", help="add or update traces from a JSON-lines file",
                              description=INGEST_HELP, formatter_class=raw)
    _store_arg(p)
    p.add_argument("file", metavar="FILE.jsonl")
    p.add_argument("--batch-size", type=int, default=1000, help="traces per commit")
    _wait_arg(p)
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
    p.add_argument("--since", metavar="TIME", help="only traces at or after TIME (ISO 8601)")
    p.add_argument("--until", metavar="TIME", help="only traces at or before TIME (ISO 8601)")
    p.add_argument("--time-field", choices=["happened_at", "recorded_at"],
                   default="happened_at", help="the time --since/--until filter on")
    p.add_argument("--hide-superseded", action="store_true",
                   help="leave out traces that a later trace supersedes")
    p.add_argument("--newest-first", action="store_true",
                   help="order equal scores newest first (by --time-field)")
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

    p = subparsers.add_parser("show", help="show traces by internal or external id",
                              description="Print traces (text, meta, times, version, vector "
                              "shapes); --json prints them in full, vectors included.\n\n"
                              "  python -m memory_store show --store S 12 --namespace u1 "
                              "note-7", formatter_class=raw)
    _store_arg(p)
    _ids_arg(p, "+")
    p.add_argument("--namespace", help="namespace of external ids")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)

    p = subparsers.add_parser("export", help="export traces (JSON lines + safetensors)",
                              description="Write traces (all, a namespace, its --session S, "
                              "or IDs) as JSON lines, with their vectors in FILE.safetensors "
                              "beside --out FILE.jsonl; `import` reads both back. Without "
                              "--out the JSON lines go to stdout, without vectors.",
                              formatter_class=raw)
    _store_arg(p)
    p.add_argument("--namespace")
    p.add_argument("--session", action="append", metavar="S", help="only this session "
                   "(repeatable; needs --namespace)")
    _ids_arg(p, "*")
    p.add_argument("--out", metavar="FILE.jsonl", help="output file (default stdout)")
    p.add_argument("--no-vectors", action="store_true", help="leave out vectors and values")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("import", help="import an export (JSON lines + safetensors)",
                              description="Add the traces of `export --out FILE.jsonl` (and "
                              "FILE.safetensors) to a store, keeping ids, versions and times: "
                              "the new store searches like the exported one. The whole file "
                              "is checked first.")
    _store_arg(p)
    p.add_argument("file", metavar="FILE.jsonl")
    p.add_argument("--new-ids", action="store_true",
                   help="assign new internal ids (to merge into a non-empty store)")
    _wait_arg(p)
    p.set_defaults(func=cmd_import)

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

    p = subparsers.add_parser("delete", help="delete traces, a session or a whole namespace",
                              description="Delete IDs of --namespace NS, its --session S, or "
                              "the whole namespace when neither is given.\n\n"
                              "  python -m memory_store delete --store S --namespace u1 note-7",
                              formatter_class=raw)
    _store_arg(p)
    p.add_argument("--namespace", required=True)
    p.add_argument("--session")
    _ids_arg(p, "*")
    _wait_arg(p)
    p.set_defaults(func=cmd_delete)

    p = subparsers.add_parser("compact", help="reclaim the disk space of deleted traces",
                              description="Rewrite the indexes without deleted rows, trim the "
                              "change log and replace the LMDB files by a compacted copy.")
    _store_arg(p)
    _wait_arg(p)
    p.set_defaults(func=cmd_compact)


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
                                 description="Administer trace stores (LMDB + FAISS).",
                                 epilog="Run `python -m memory_store COMMAND --help` for the "
                                 "options and examples of each command.")
    add_traces_subcommands(ap.add_subparsers(dest="command", required=True,
                                             metavar="COMMAND"))
    return run(ap.parse_args(argv))
