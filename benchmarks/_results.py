"""Append one benchmark result row (with hardware, versions and git sha) to
``benchmarks/results/<name>.jsonl``. Shared helper: any benchmark may use it.

    from benchmarks._results import append_result, environment
    append_result("bench_store", {"metric": ..., ...})
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from sessions.runs import cpu_model, mem_gib

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_PACKAGES = ("numpy", "faiss-cpu", "faiss-gpu-cu12", "lmdb", "torch", "sentence-transformers",
             "chromadb", "triton", "transformers")


def git_sha() -> str:
    """Short HEAD sha (with ``+dirty`` when the tree has changes), or ``uncommitted``.
    ``BENCH_GIT_SHA`` overrides it: a copy of the tree without ``.git`` (the GPU machine's)
    is told the sha it was copied from."""
    if os.environ.get("BENCH_GIT_SHA"):
        return os.environ["BENCH_GIT_SHA"]
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                             capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uncommitted"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, text=True,
                           capture_output=True).stdout.strip()
    return sha + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    versions = {}
    for p in _PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha(), "host": platform.node(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "mem_gib": mem_gib(), "gpu": gpu,
            "python": platform.python_version(), "versions": versions}


def append_result(name: str, row: dict[str, Any]) -> Path:
    """Append ``row`` plus the environment to ``results/<name>.jsonl``; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps({"benchmark": name, **environment(), **row}) + "\n")
    return path
