"""Results of a run: ``summarize`` turns an arm's ``probes.jsonl`` / ``sessions.jsonl`` into
``summary.json`` numbers; tables in markdown; plots as PNG (matplotlib, no display).

Summary of one arm (floats rounded to 6 digits, keys sorted: byte-stable):
  exact_match, answer_bits_per_byte, probes, episodes;
  by_session (probe's session index) and by_tag (every scalar probe tag, e.g. ``distance``,
  ``updated``): exact match and count;
  written (traces per session, and how often a probe's evidence had been written);
  evidence_recall_at (per read layer: evidence among the first 1 / k retrieved traces);
  context_bits_per_byte (overall, by session, and for sessions after the first by class of
  position when the task labels positions) for tasks that score their context;
  memory (traces, tokens and bytes the arm's memory holds at the end of its episodes);
  generation (tasks whose sessions generate: how often the model's generation was right, and
  exact match of the probes whose evidence is a generation, by whether it was right);
  evidence_recall (mean fraction of a probe's evidence among the first 1 / 5 / 10 traces each
  read layer retrieved and, for text-retrieval tasks, the store's text search), by tag.

``context_comparison`` pairs the per-session bits/byte of arms (same episodes, same sessions)
against a reference arm: mean relative difference with a 95% bootstrap interval, overall and
by class of position.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from sessions.runs import read_jsonl


def _r(x: float) -> float:
    return round(float(x), 6)


def _group(rows: list[dict], key) -> dict[str, dict]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        groups[str(key(r))].append(r["exact"])
    return {k: {"exact_match": _r(sum(v) / len(v)), "probes": len(v)}
            for k, v in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))}


def _sort_key(k: str):
    return (0, int(k), "") if k.lstrip("-").isdigit() else (1, 0, k)


def summarize(arm_dir: Path) -> dict:
    probes = read_jsonl(Path(arm_dir) / "probes.jsonl")
    sessions = read_jsonl(Path(arm_dir) / "sessions.jsonl")
    out: dict = {"probes": len(probes), "episodes": len({s["namespace"] for s in sessions})}
    if probes:
        n_bytes = sum(p["answer_bytes"] for p in probes)
        out["exact_match"] = _r(sum(p["exact"] for p in probes) / len(probes))
        out["answer_bits_per_byte"] = _r(sum(p["answer_bits"] for p in probes) / n_bytes)
        out["by_session"] = _group(probes, lambda p: p["index"])
        tags = sorted({k for p in probes for k, v in p["tags"].items()
                       if isinstance(v, (str, int, float, bool))})
        out["by_tag"] = {t: _group([p for p in probes if t in p["tags"]],
                                   lambda p, t=t: p["tags"][t]) for t in tags}
        out["evidence_recall_at"] = _evidence_recall(probes)
    written = {(s["namespace"], s["session"]): set(s["written"]) for s in sessions}
    out["written"] = {"traces": sum(len(w) for w in written.values()),
                      "per_session": _r(statistics.mean(len(w) for w in written.values()))
                      if written else 0.0}
    with_evidence = [p for p in probes if p["evidence"]]
    if with_evidence:
        by_ns: dict[str, set] = defaultdict(set)
        for (ns, _), ids in written.items():
            by_ns[ns] |= ids
        hit = [all(e in by_ns[p["namespace"]] for e in p["evidence"]) for p in with_evidence]
        out["written"]["evidence_written"] = _r(sum(hit) / len(hit))
    stored = [s for s in sessions if "memory_bytes" in s]
    if stored:
        out["memory"] = {"traces": out["written"]["traces"],
                         "tokens": sum(s["written_tokens"] for s in stored),
                         "bytes": sum(s["memory_bytes"] for s in stored)}
    generation = _generation(probes, sessions)
    if generation:
        out["generation"] = generation
    recall = _evidence_recall_at(arm_dir, probes)
    if recall:
        out["evidence_recall"] = recall
    scored = [s for s in sessions if "context_bits" in s and s["context_bytes"]]
    if scored:
        by: dict[str, list] = defaultdict(lambda: [0.0, 0])
        for s in scored:
            by[str(s["index"])][0] += s["context_bits"]
            by[str(s["index"])][1] += s["context_bytes"]
        out["context_bits_per_byte"] = {
            "all": _r(sum(s["context_bits"] for s in scored) / sum(s["context_bytes"]
                                                                    for s in scored)),
            "by_session": {k: _r(b / n) for k, (b, n) in sorted(
                by.items(), key=lambda kv: int(kv[0]))}}
        classes: dict[str, list] = defaultdict(lambda: [0.0, 0])
        for s in scored:
            for label, (bits, n) in s.get("context_by_class", {}).items():
                classes[label][0] += bits
                classes[label][1] += n
        if classes:
            out["context_bits_per_byte"]["by_class"] = {
                k: {"bits_per_byte": _r(b / n), "bytes": n} for k, (b, n) in sorted(
                    classes.items()) if n}
    return out


def _generation(probes: list[dict], sessions: list[dict]) -> dict:
    """How often generations were right; probes reading a generation, by its correctness."""
    made = {(s["namespace"], g["id"]): g for s in sessions for g in s.get("generated", [])}
    if not made:
        return {}
    out = {"count": len(made),
           "answer_correct": _r(sum(g["answer_correct"] for g in made.values()) / len(made)),
           "exact": _r(sum(g["exact"] for g in made.values()) / len(made))}
    groups: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for p in probes:
        gens = [made[(p["namespace"], e)] for e in p["evidence"] if (p["namespace"], e) in made]
        if gens:
            right = all(g["answer_correct"] for g in gens)
            # copied: the prediction is how the model's own generation ended (right or wrong)
            copied = bool(p["prediction"]) and any(
                g["text"].rstrip().endswith(p["prediction"]) for g in gens)
            groups["generation right" if right else "generation wrong"].append(
                (p["exact"], copied))
    out["probes_by_generation"] = {
        k: {"exact_match": _r(sum(e for e, _ in v) / len(v)),
            "copied_generation": _r(sum(c for _, c in v) / len(v)), "probes": len(v)}
        for k, v in sorted(groups.items())}
    return out


RECALL_AT = (1, 5, 10)


def _evidence_recall_at(arm_dir: Path, probes: list[dict]) -> dict:
    """Mean fraction of each probe's evidence among the first k retrieved traces, per read
    layer (from retrievals.jsonl) and for the store's text search, overall and by tag."""
    with_ev = [p for p in probes if p["evidence"]]
    path = Path(arm_dir) / "retrievals.jsonl"
    if not with_ev or not path.exists():
        return {}
    lists: dict[str, dict[tuple, list]] = defaultdict(dict)
    for r in read_jsonl(path):
        lists[f"layer {r['layer']}"][(r["namespace"], r["session"], r["probe"])] = [
            t["external_id"] for t in r["traces"]]
    for p in with_ev:
        if "text_retrieved" in p:
            lists["text search"][(p["namespace"], p["session"], p["probe"])] = \
                p["text_retrieved"]
    out = {}
    for source, by_probe in sorted(lists.items()):
        rows = []
        for p in with_ev:
            got = by_probe.get((p["namespace"], p["session"], p["probe"]), [])
            ev = set(p["evidence"])
            rows.append((p, {f"@{k}": len(ev & set(got[:k])) / len(ev) for k in RECALL_AT}))
        out[source] = {"probes": len(rows), **_mean_recall(rows)}
        tags = sorted({t for p, _ in rows for t, v in p["tags"].items()
                       if isinstance(v, (str, int, bool))})
        out[source]["by_tag"] = {t: {str(v): {"probes": len(g), **_mean_recall(g)}
                                     for v, g in sorted(_by(rows, t).items(),
                                                        key=lambda kv: _sort_key(str(kv[0])))}
                                 for t in tags}
    return out


def _by(rows, tag):
    groups = defaultdict(list)
    for p, r in rows:
        if tag in p["tags"]:
            groups[p["tags"][tag]].append((p, r))
    return groups


def _mean_recall(rows) -> dict:
    return {f"@{k}": _r(sum(r[f"@{k}"] for _, r in rows) / len(rows)) for k in RECALL_AT}


# ---- paired comparison of context bits/byte --------------------------------------------
def session_bits(arm_dir: Path, first: int = 1) -> dict[tuple, dict]:
    """(namespace, session) -> {"all": (bits, bytes), class: (bits, bytes)} of sessions
    ``index >= first`` (the first session has no memory to read)."""
    out = {}
    for s in read_jsonl(Path(arm_dir) / "sessions.jsonl"):
        if s["index"] >= first and s.get("context_bytes"):
            cells = {"all": (s["context_bits"], s["context_bytes"])}
            cells.update({k: tuple(v) for k, v in s.get("context_by_class", {}).items()})
            out[(s["namespace"], s["session"])] = cells
    return out


def bootstrap_ci(values: list[float], n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resamples drawn from ``seed``)."""
    import numpy as np

    if len(values) < 2:
        return float("nan"), float("nan")
    x = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def context_comparison(arm_dirs: dict[str, Path], reference: str) -> dict:
    """Per arm against ``reference``: per-session paired differences of bits/byte over the
    sessions after the first, as mean relative difference (%) with a 95% bootstrap interval
    (resampling sessions), the bits/byte pooled over those sessions, and the same by class
    of position (sessions where the class occurs)."""
    ref = session_bits(arm_dirs[reference])
    out = {}
    for arm, folder in arm_dirs.items():
        if arm == reference:
            continue
        mine = session_bits(folder)
        keys = sorted(set(mine) & set(ref))
        if not keys:
            continue
        classes = sorted({c for k in keys for c in mine[k]} & {c for k in keys for c in ref[k]})
        out[arm] = {}
        for c in classes:
            pairs = [(mine[k][c], ref[k][c]) for k in keys
                     if c in mine[k] and c in ref[k] and ref[k][c][1]]
            rel = [100 * ((a[0] / a[1]) / (b[0] / b[1]) - 1) for a, b in pairs]
            lo, hi = bootstrap_ci(rel)
            out[arm][c] = {
                "sessions": len(pairs), "bytes": sum(b[1] for _, b in pairs),
                "bpb": _r(sum(a[0] for a, _ in pairs) / sum(a[1] for a, _ in pairs)),
                "reference_bpb": _r(sum(b[0] for _, b in pairs) / sum(b[1] for _, b in pairs)),
                "mean_rel_diff_pct": _r(statistics.mean(rel)),
                "ci95_pct": [_r(lo), _r(hi)]}
    return out


def comparison_table(comparison: dict, reference: str) -> str:
    """One row per (arm, class of position): bits/byte against the reference arm's."""
    lines = [f"| arm | positions | sessions | bytes | bits/byte | {reference} bits/byte | "
             "paired Δ % (mean) | 95% CI |", "|" + "---|" * 8]
    for arm, by in comparison.items():
        for c, v in by.items():
            lo, hi = v["ci95_pct"]
            lines.append(f"| {arm} | {c} | {v['sessions']} | {v['bytes']} | {v['bpb']:.4f} | "
                         f"{v['reference_bpb']:.4f} | {v['mean_rel_diff_pct']:+.2f} | "
                         f"[{lo:+.2f}, {hi:+.2f}] |")
    return "\n".join(lines)


def memory_table(arms: dict[str, dict]) -> str:
    """Per arm: bits/byte of the sessions after the first beside what its memory holds."""
    lines = ["| arm | context bits/byte (sessions ≥ 2) | traces | tokens | memory bytes |",
             "|---|---|---|---|---|"]
    for name, s in arms.items():
        by = s.get("context_bits_per_byte", {}).get("by_session", {})
        later = [v for k, v in by.items() if int(k) >= 1]
        mem = s.get("memory", {})
        lines.append(f"| {name} | {_fmt(statistics.mean(later)) if later else '—'} | "
                     f"{mem.get('traces', 0)} | {mem.get('tokens', 0)} | "
                     f"{mem.get('bytes', 0):,} |")
    return "\n".join(lines)


def recall_table(summary: dict) -> str:
    """Evidence recall@1/5/10 per retrieval source, overall and by every tag value."""
    rec = summary.get("evidence_recall", {})
    if not rec:
        return ""
    lines = ["| source | group | probes | @1 | @5 | @10 |", "|---|---|---|---|---|---|"]
    for source, r in rec.items():
        lines.append(f"| {source} | all | {r['probes']} | {r['@1']:.3f} | {r['@5']:.3f} | "
                     f"{r['@10']:.3f} |")
        for tag, groups in r.get("by_tag", {}).items():
            for v, g in groups.items():
                lines.append(f"| {source} | {tag} {v} | {g['probes']} | {g['@1']:.3f} | "
                             f"{g['@5']:.3f} | {g['@10']:.3f} |")
    return "\n".join(lines)


def _evidence_recall(probes: list[dict]) -> dict:
    """Per read layer: fraction of probes with evidence whose evidence is at rank ≤ 1 / ≤ k."""
    rows = [p for p in probes if p["evidence"] and p["evidence_rank"]]
    if not rows:
        return {}
    out = {}
    for layer in sorted({layer for p in rows for layer in p["evidence_rank"]}, key=int):
        ranks = [p["evidence_rank"].get(layer) for p in rows]
        out[layer] = {"@1": _r(sum(r == 1 for r in ranks) / len(ranks)),
                      "@any": _r(sum(r is not None for r in ranks) / len(ranks))}
    return out


# ---- tables ----------------------------------------------------------------------------
def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def arms_table(arms: dict[str, dict]) -> str:
    """One row per arm: exact match overall, by session, and answer bits/byte."""
    sessions = sorted({k for s in arms.values() for k in s.get("by_session", {})}, key=int)
    head = ["arm", "exact match", *[f"session {int(k) + 1}" for k in sessions],
            "answer bits/byte", "traces written"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in arms.items():
        by = s.get("by_session", {})
        lines.append("| " + " | ".join([name, _fmt(s.get("exact_match")),
                                        *[_fmt(by.get(k, {}).get("exact_match")) for k in sessions],
                                        _fmt(s.get("answer_bits_per_byte")),
                                        str(s["written"]["traces"])]) + " |")
    return "\n".join(lines)


def tag_table(arms: dict[str, dict], tag: str) -> str:
    values = sorted({v for s in arms.values() for v in s.get("by_tag", {}).get(tag, {})},
                    key=_sort_key)
    if not values:
        return ""
    lines = ["| arm | " + " | ".join(f"{tag} {v}" for v in values) + " |",
             "|" + "---|" * (len(values) + 1)]
    for name, s in arms.items():
        by = s.get("by_tag", {}).get(tag, {})
        lines.append(f"| {name} | " + " | ".join(
            f"{by[v]['exact_match']:.3f} (n={by[v]['probes']})" if v in by else "—"
            for v in values) + " |")
    return "\n".join(lines)


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ---- plots -----------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(curves: dict[str, list[dict]], path: Path) -> Path:
    """Training loss (and validation exact match where logged) against step, per model."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, rows in curves.items():
        train = [r for r in rows if "loss" in r]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        val = [r for r in rows if isinstance(r.get("val"), dict) and "val_exact" in r["val"]]
        if val:
            axes[1].plot([r["step"] for r in val], [r["val"]["val_exact"] for r in val],
                         marker="o", label=name)
    axes[0].set(xlabel="step", ylabel="LM loss (nats/byte)", title="training loss")
    axes[1].set(xlabel="step", ylabel="exact match", title="validation (tensor memory)",
                ylim=(-0.02, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_by(arms: dict[str, list[dict]], key: str, path: Path, xlabel: str) -> Path:
    """Exact match (mean ± std over seeds) against a grouping (session index or a tag) for
    every arm. ``arms``: arm -> one summary per seed; ``key``: ``by_session`` or a tag."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, summaries in arms.items():
        groups = [s.get("by_session", {}) if key == "by_session" else
                  s.get("by_tag", {}).get(key, {})
                  for s in summaries]
        xs = sorted({k for g in groups for k in g}, key=_sort_key)
        if not xs:
            continue
        stats = [mean_std([g[x]["exact_match"] for g in groups if x in g]) for x in xs]
        labels = [str(int(x) + 1) if key == "by_session" else x for x in xs]
        ax.errorbar(labels, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                    capsize=3, label=name)
    ax.set(xlabel=xlabel, ylabel="exact match", ylim=(-0.02, 1.02))
    return _save(fig, [ax], path)


def plot_ablation(arms: dict[str, list[float]], path: Path, metric: str = "exact match"
                  ) -> Path:
    """Bars: mean over seeds per arm, error bars: standard deviation, dots: each seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.3 * len(arms) + 2, 3.8))
    names = list(arms)
    stats = [mean_std(arms[n]) for n in names]
    ax.bar(names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4,
           color="#6a9fd4", edgecolor="#2b5d8a")
    for i, n in enumerate(names):
        ax.scatter([i] * len(arms[n]), arms[n], color="k", s=10, zorder=3)
    top = max(1.05, max(m for m, _ in stats) * 1.1)  # bits/byte exceed 1
    ax.set(ylabel=metric, ylim=(0, top), title=f"memory ablation ({len(next(iter(arms.values())))}"
           " seed(s))")
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def task_sections(arms: dict[str, dict], arm_dirs: dict[str, Path], out_dir: Path,
                  prefix: str = "") -> tuple[list[str], list[Path]]:
    """Report sections (markdown lines) and plots for what a task measures beyond exact
    match: context bits/byte (paired against ``trained-off`` and ``off``, memory footprint),
    generations, evidence recall@k. Used by the ``engram run`` and ``engram ablate`` reports."""
    lines, plots = [], []
    if any("context_bits_per_byte" in s for s in arms.values()):
        lines += [f"## {prefix}Context bits per byte", "",
                  "Sessions after the first (each reads the traces of earlier ones); paired "
                  "per-session differences, 95% bootstrap CI over sessions; positions: `name` "
                  "(a name from an earlier session), `phrase` (12 bytes seen in an earlier "
                  "session), `other`.", "", memory_table(arms), ""]
        for ref in ("trained-off", "off"):
            if ref in arm_dirs:
                comp = context_comparison(arm_dirs, ref)
                if comp:
                    lines += [f"### {prefix}Against `{ref}`", "", comparison_table(comp, ref), ""]
        plots.append(plot_context(arms, out_dir / f"{_slug(prefix)}context_bpb_by_session.png"))
    for name, s in arms.items():
        gen = s.get("generation")
        if gen:
            lines += [f"## {prefix}Generations (`{name}`)", "",
                      f"{gen['count']} generations: final answer right {gen['answer_correct']:.3f}"
                      f", identical to the reference {gen['exact']:.3f}.", "",
                      "| probes whose evidence is a generation | probes | exact match | "
                      "prediction = the generation's own answer |", "|---|---|---|---|"]
            for k, v in gen.get("probes_by_generation", {}).items():
                lines.append(f"| {k} | {v['probes']} | {v['exact_match']:.3f} | "
                             f"{v['copied_generation']:.3f} |")
            lines.append("")
        if s.get("evidence_recall"):
            lines += [f"## {prefix}Evidence recall (`{name}`)", "",
                      "Mean fraction of a probe's evidence among the first k traces retrieved "
                      "at the position predicting the first answer byte.", "",
                      recall_table(s), ""]
    return lines, plots


def _slug(prefix: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in prefix.strip().lower()).strip("_") + \
        ("_" if prefix.strip() else "")


def plot_context(arms: dict[str, dict], path: Path) -> Path:
    """Context bits/byte by session, one line per arm."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, s in arms.items():
        by = s.get("context_bits_per_byte", {}).get("by_session", {})
        if by:
            xs = sorted(by, key=int)
            ax.plot([int(x) + 1 for x in xs], [by[x] for x in xs], marker="o", label=name)
    ax.set(xlabel="session", ylabel="bits per byte", title="context bits/byte by session")
    return _save(fig, [ax], path)


def _save(fig, axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
