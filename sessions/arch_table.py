"""``docs/architecture_table.md`` from ``engram bench architectures`` results files, and
nothing else: every number is read or derived (means, standard deviations, differences) from
the results; the source report's figures are the constants in ``CLAIMS``. ``checks`` finds
the rows a comparison must not use (a collapsed router, a level-1 router the LM loss does not
reach); claims involving such a row say so instead of comparing.

Means ± sample standard deviations over seeds. A claim's difference is paired by seed (the
same data and batches; for latency, the same moment's load: a seed's models are timed side by
side) and shown as mean ± std of the per-seed differences; "within noise" when its mean is
smaller than its standard deviation.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from sessions.arch_eval import MIN_LEVEL1_GRAD_RATIO

SOURCE = "the source design report (its figures; our scale is ~10^5-10^6 times smaller)"
MHC = ("hierarchical/base", "progressive/base")  # the full design: two levels + sharing
STANDARD = "flat_moe/none"  # the "standard MoE" of the claims
PRESET_ORDER = ("cpu", "gpu", "test")


def results_files(path: Path) -> list[Path]:
    """``path`` and the other presets' results files beside it, in preset order."""
    path = Path(path)
    found = {path}
    found |= {path.with_name(f"architectures_{p}.json") for p in PRESET_ORDER}
    files = [f for f in found if f.is_file()]
    order = {f"architectures_{p}.json": i for i, p in enumerate(PRESET_ORDER)}
    return sorted(files, key=lambda f: (order.get(f.name, 99), str(f)))


def write(path: Path, files: list[Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render([json.loads(Path(f).read_text()) for f in files]))
    return path


# ---- per-run reading ---------------------------------------------------------------------
def _get(row: dict, dotted: str):
    node = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def routing_us(row: dict, backend: str, with_permute: bool = False) -> float | None:
    """Routing µs per 1k tokens per layer, mean over layers; progressive adds its encoder
    divided by the layers (it runs once for all of them)."""
    lat = (row.get("latency") or {}).get(backend)
    if not lat:
        return None
    per_layer = lat["router_permute_us_per_1k" if with_permute else "router_us_per_1k"]
    enc = lat.get("encoder_us_per_1k", 0.0) / len(per_layer)
    return statistics.fmean(per_layer) + enc


def row_problems(row: dict) -> list[str]:
    out = list(_get(row, "eval.balance.collapse") or [])
    ratio = _get(row, "eval.level1_grad_ratio")
    if ratio is not None and ratio < MIN_LEVEL1_GRAD_RATIO:
        out.append(f"LM-loss gradient on level 1 is {ratio:.1e} of level 2's: only the "
                   "auxiliary losses train it")
    return out


def checks(results: dict) -> dict:
    collapsed, untrained = [], []
    for r in results["runs"]:
        where = f"{r['model']} ({r['matching']} matching, seed {r['seed']})"
        for p in row_problems(r):
            (untrained if p.startswith("LM-loss") else collapsed).append(f"{where}: {p}")
    return {"collapsed": collapsed, "level1_untrained": untrained}


def one_line(row: dict) -> str:
    ev = row["eval"]
    l1 = _get(row, "eval.level1.accuracy")
    bal = ev.get("balance", {})
    return (f"{row['model']:20s} {row['train']['steps']} steps {row['train']['seconds']:.0f} s "
            f"({row['train']['step_ms']:.0f} ms/step), bpb " + " ".join(
                f"{k[:4]} {ev['bpb'][k]:.2f}" for k in ("literature", "code", "arithmetic"))
            + f", mixed {ev.get('mixed_bpb', float('nan')):.2f}"
            + (f", level-1 acc {l1:.3f}" if l1 is not None else "")
            + (f", dead {bal['dead_experts']}" if bal else "")
            + ("" if not row_problems(row) else " [FAILS CHECK]"))


# ---- aggregation -------------------------------------------------------------------------
class Stat:
    def __init__(self, values: list[float]):
        self.values = [v for v in values if v is not None]
        self.mean = statistics.fmean(self.values) if self.values else None
        self.std = statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def fmt(self, digits: int = 3, pct: bool = False) -> str:
        if self.mean is None:
            return "—"
        scale, unit = (100.0, "%") if pct else (1.0, "")
        if digits == 0 and self.std == 0:  # a count, the same for every seed
            return f"{self.mean:,.0f}"
        if len(self.values) < 2:
            return f"{self.mean * scale:.{digits}f}{unit}"
        return f"{self.mean * scale:.{digits}f} ± {self.std * scale:.{digits}f}{unit}"


def group(results: dict, matching: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results["runs"]:
        if r["matching"] == matching:
            out.setdefault(r["model"], []).append(r)
    return out


def stat(rows: list[dict], fn) -> Stat:
    return Stat([fn(r) for r in rows])


def _bad(rows: list[dict]) -> bool:
    return any(row_problems(r) for r in rows)


# ---- rendering ---------------------------------------------------------------------------
def render(all_results: list[dict]) -> str:
    lines = ["# Architecture table: the source report's claims at our scale", "",
             "Generated by `engram bench architectures` (`sessions/arch_table.py`) from the "
             "results files named in each section; nothing here is typed by hand. Source "
             f"figures: {SOURCE}. Mean ± std over seeds; the differences in the claims are "
             "paired by seed (mean ± std of the per-seed differences).", ""]
    for res in all_results:
        lines += _section(res)
    return "\n".join(lines) + "\n"


def _section(res: dict) -> list[str]:
    env, st = res["env"], res["settings"]
    m, t = st["model"], st["train"]
    f = m["ffn"]
    data = res["data"][str(res["seeds"][0])]
    sha = env["git_sha"][:10] + (" (dirty tree)" if env.get("git_dirty") else " (clean tree)")
    tokens = t["steps"] * t["batch_size"] * m["seq_len"]
    out = [f"## Preset `{res['preset']}`", "",
           f"* Command: `{' '.join(env['command'])}`; commit {sha}; {env['date']}.",
           f"* Hardware: {env['cpu']} ({env['cores']} cores), GPU: {env['gpu'] or 'none'}; "
           f"torch {env['versions'].get('torch')}, triton {env['versions'].get('triton', '—')}"
           f", Python {env['python']}; {env['torch_threads']} torch thread(s); load average "
           f"(1/5/15 min) {_load(env['load_avg_start'])} at start, "
           f"{_load(env['load_avg_end'])} at end; whole run {res['wall_seconds'] / 60:.1f} min.",
           f"* Seeds {', '.join(map(str, res['seeds']))}. Model: d {m['d_model']}, "
           f"{m['n_layers']} layers, seq {m['seq_len']}; MoE {f['n_domains']} domains × "
           f"{f['n_components']} components (= {f['n_domains'] * f['n_components']} experts), "
           f"k {f['k1']}×{f['k2']}, expert width {f['hidden']}; progressive segments of "
           f"{f['segment_len']}. Training: {t['steps']} steps × {t['batch_size']} × "
           f"{m['seq_len']} = {tokens:,} tokens per model, lr {t['lr']}.",
           f"* Data (`train.data=domains`): literature {data['train_files']['literature']} "
           f"works for training, held out {', '.join(data['held_out_files']['literature'])}; "
           f"code = the Python {data['python']} standard library, "
           f"{data['train_files']['code']} files for training, "
           f"{len(data['held_out_files']['code'])} held out; arithmetic by seed; mixed items "
           "(verse_code, prose_arithmetic, arithmetic_code) from held-out sources only.",
           f"* Routing latency: the model's own router on the inputs of a held-out forward "
           f"({', '.join(st['latency_backends'])} kernels), median of {st['latency_repeats']} "
           "synchronised eager calls, µs per 1k tokens per layer (progressive: + its encoder / "
           "layers).", ""]
    out += _claims(res) + [""]
    for matching in ("active", "total"):
        out += _models(res, matching) + [""]
    failed = res["checks"]["collapsed"] + res["checks"]["level1_untrained"]
    out += ["Checks (collapse: more than 25% of a layer's experts dead, or one domain over 95% "
            "of the tokens, on held-out data of all domains; level 1 reached by the LM loss): "
            + ("**failed** — " + "; ".join(failed) if failed else "all rows pass."), ""]
    return out


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def _backend(res: dict) -> str:
    backs = res["settings"]["latency_backends"]
    dev = "cuda" if res["settings"]["train"]["device"] == "cuda" else "cpu"
    return f"{dev}:{backs[0]}"


def _claims(res: dict) -> list[str]:
    act, tot = group(res, "active"), group(res, "total")
    std = act.get(STANDARD, [])
    rows = []

    def compare(a_rows, b_rows, fn, digits, pct=False, rel=True):
        if not a_rows or not b_rows:
            return "—", None
        bad = [r[0]["model"] for r in (a_rows, b_rows) if _bad(r)]
        if bad:
            return f"not compared: {', '.join(bad)} failed a check", None
        a, b = stat(a_rows, fn), stat(b_rows, fn)
        if a.mean is None or b.mean is None:
            return "—", None
        # paired by seed: the same data, batches and (latency) the same moment's load
        pairs = [(fn(x), fn(y)) for x in a_rows for y in b_rows if x["seed"] == y["seed"]]
        d = Stat([(u / v - 1) if rel else (u - v) for u, v in pairs])
        noise = d.std > 0 and abs(d.mean) < d.std
        scale = 100 if (pct and not rel) else 1
        shown = (f"{d.mean:+.1%}" if rel else f"{d.mean * scale:+.{digits}f}") + \
            (f" ± {d.std:.1%}" if rel else f" ± {d.std * scale:.{digits}f}") * (d.std > 0) + \
            (" pts" if pct and not rel else "")
        return (f"{a.fmt(digits, pct)} vs {b.fmt(digits, pct)} ({shown}"
                + (", within noise)" if noise else ")")), (d.mean, noise, len(pairs))

    def verdict(d, better_if_negative: bool, what: str, exact: bool = False) -> str:
        """``exact``: a deterministic quantity (parameter counts) needs no noise estimate;
        anything trained or timed on one seed has none, and says so."""
        if d is None:
            return "not measured"
        delta, noise, n = d
        if noise:
            return f"no measurable difference in {what}"
        good = delta < 0 if better_if_negative else delta > 0
        caveat = "" if exact or n > 1 else "; one seed, no noise estimate"
        return ("holds" if good else "does not hold") + f" here ({what}{caveat})"

    params_total = lambda r: r["params"]["total"]  # noqa: E731
    params_active = lambda r: r["params"]["active"]  # noqa: E731
    for name in MHC:
        cell, d = compare(act.get(name, []), std, params_total, 0)
        rows.append(("25% fewer total parameters (900B vs 1.2T)", f"{name} vs {STANDARD}, "
                     "active matching", cell,
                     verdict(d, True, "sharing saves gate/up", exact=True)))
    for name in MHC:
        cell, d = compare(tot.get(name, []), tot.get(STANDARD, []), params_active, 0)
        rows.append(("fewer active parameters (28.1B vs 37.5B)", f"{name} vs {STANDARD}, "
                     "total matching (active matching: equal by design)", cell,
                     verdict(d, True, "active per token", exact=True)))
    for backend in res["settings"]["latency_backends"]:
        key = f"{_backend(res).split(':')[0]}:{backend}"
        for name in ("progressive/none", "hierarchical/none"):
            cell, d = compare(act.get(name, []), std, lambda r, k=key: routing_us(r, k), 1)
            rows.append(("40% lower routing latency (4.9 vs 8.2 ms)", f"{name} vs {STANDARD}, "
                         f"{key}, µs/1k tokens/layer", cell, verdict(d, True, "router time")))
    for name, path, what in (("progressive/base", "eval.level1.accuracy_direct",
                              "domain d = label d"),
                             ("progressive/base", "eval.level1.accuracy_ctx",
                              "after the first segment, mapped"),
                             ("hierarchical/base", "eval.level1.accuracy", "mapped")):
        rows_ = act.get(name, [])
        s = stat(rows_, lambda r, p=path: _get(r, p))
        cell = "—" if s.mean is None else s.fmt(1, pct=True)
        v = "not measured" if s.mean is None else \
            ("holds" if s.mean >= 0.992 else "below the source's 99.2%")
        if rows_ and _bad(rows_):
            cell, v = f"not compared: {name} failed a check", "not measured"
        rows.append(("99.2% routing accuracy", f"{name}, level 1 vs true domain, held-out "
                     f"tokens ({what})", cell, v))
    for name in MHC:
        cell, d = compare(act.get(name, []), std, lambda r: r["eval"].get("mixed_accuracy"),
                          1, pct=True, rel=False)
        rows.append(("cross-domain accuracy 87.6% vs 78.4%", f"{name} vs {STANDARD}: next-byte "
                     "accuracy on mixed items", cell, verdict(d, False, "mixed accuracy")))
        cell, d = compare(act.get(name, []), std, lambda r: r["eval"].get("mixed_bpb"), 3)
        rows.append(("(same, as bits/byte)", f"{name} vs {STANDARD}: mixed-item bits/byte",
                     cell, verdict(d, True, "mixed bits/byte")))
    for kind in ("hierarchical", "progressive"):
        cell, d = compare(act.get(f"{kind}/base", []), act.get(f"{kind}/none", []),
                          lambda r: r["eval"].get("mixed_accuracy"), 1, pct=True, rel=False)
        rows.append(("sharing improves cross-domain by 12%", f"{kind}: base vs none, mixed "
                     "next-byte accuracy (active matching)", cell,
                     verdict(d, False, "mixed accuracy")))
        cell, d = compare(tot.get(f"{kind}/base", []), tot.get(f"{kind}/none", []),
                          lambda r: r["eval"].get("mixed_bpb"), 3)
        rows.append(("(same, equal total parameters)", f"{kind}: base vs none, mixed bits/byte "
                     "(total matching)", cell, verdict(d, True, "mixed bits/byte")))
    out = ["### The claims", "", "| claim (source report) | our measurement | ours | reading |",
           "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {v} |" for a, b, c, v in rows]
    return out


def _models(res: dict, matching: str) -> list[str]:
    rows = group(res, matching)
    backend = _backend(res)
    title = {"active": "Matched on active parameters per token (equal expert width)",
             "total": f"Matched on total parameters (each width closest to {STANDARD}'s "
                      "total in the active matching)"}[matching]
    out = [f"### {title}", "",
           "| model | FFN width | total params | active / token | step ms | bpb literature | "
           "bpb code | bpb arithmetic | bpb mixed | acc. mixed | level-1 acc. | expert CV | "
           f"dead experts | routing µs/1k/layer ({backend}) | + permute | wall s | check |",
           "|" + "---|" * 17]
    for name, rs in rows.items():
        r0 = rs[0]
        tot = f"{r0['params']['total']:,}"
        if matching == "total":
            tot += f" ({r0['match_error']:+.1%})"
        width = r0["hidden"]
        if r0["kind"] == "dense":
            width = r0["hidden"] * res["settings"]["model"]["ffn"]["k1"] * \
                res["settings"]["model"]["ffn"]["k2"]
        cells = [name, str(width), tot, f"{r0['params']['active']:,}",
                 stat(rs, lambda r: r["train"]["step_ms"]).fmt(1)]
        cells += [stat(rs, lambda r, k=k: r["eval"]["bpb"][k]).fmt(3)
                  for k in ("literature", "code", "arithmetic")]
        cells += [stat(rs, lambda r: r["eval"].get("mixed_bpb")).fmt(3),
                  stat(rs, lambda r: r["eval"].get("mixed_accuracy")).fmt(1, pct=True),
                  stat(rs, lambda r: _get(r, "eval.level1.accuracy")).fmt(1, pct=True),
                  stat(rs, lambda r: _get(r, "eval.balance.expert_cv")).fmt(2),
                  stat(rs, lambda r: _get(r, "eval.balance.dead_experts")).fmt(1),
                  stat(rs, lambda r: routing_us(r, backend)).fmt(1),
                  stat(rs, lambda r: routing_us(r, backend, True)).fmt(1),
                  stat(rs, lambda r: r["wall_seconds"]).fmt(0),
                  "FAILS" if _bad(rs) else "ok"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "FFN width: each expert's hidden width (dense: its one MLP's, hidden·k1·k2). "
            "Dense has no router: dead experts and routing time do not apply (—). "
            "Level-1 accuracy: the router domain of each held-out token's best expert, mapped "
            "to data domains by the training majority (group-limited: its groups). "
            "Step ms: training seconds ÷ steps, compilation included (Triton's JIT for the "
            "first model of a shape in a process; with train.cuda_graph, the capture), hence "
            "the spread over seeds where seed 0 paid it."]
    return out
