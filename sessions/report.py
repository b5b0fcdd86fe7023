"""Results of a run: ``summarize`` turns an arm's ``probes.jsonl`` / ``sessions.jsonl`` into
``summary.json`` numbers; tables in markdown; plots as PNG (matplotlib, no display).

Summary of one arm (floats rounded to 6 digits, keys sorted: byte-stable):
  exact_match, answer_bits_per_byte, probes, episodes;
  by_session (probe's session index) and by_tag (every scalar probe tag, e.g. ``distance``,
  ``updated``): exact match and count;
  written (traces per session, and how often a probe's evidence had been written);
  evidence_recall_at (per read layer: evidence among the first 1 / k retrieved traces);
  context_bits_per_byte (overall and by session) for tasks that score their context.
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
    return out


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
        groups = [s["by_session"] if key == "by_session" else s.get("by_tag", {}).get(key, {})
                  for s in summaries]
        xs = sorted({k for g in groups for k in g}, key=_sort_key)
        if not xs:
            continue
        stats = [mean_std([g[x]["exact_match"] for g in groups if x in g]) for x in xs]
        labels = [str(int(x) + 1) if key == "by_session" else x for x in xs]
        ax.errorbar(labels, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                    capsize=3, label=name)
    ax.set(xlabel=xlabel, ylabel="exact match", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    ax.set(ylabel=metric, ylim=(0, 1.05), title=f"memory ablation ({len(next(iter(arms.values())))}"
           " seed(s))")
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
