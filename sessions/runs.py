"""The run folder, the unit of reproducibility: ``runs/<name>/`` holds

    config.yaml        the resolved experiment config (every field, defaults included)
    env.json           git sha and dirty flag, package versions, hardware, command line,
                       seeds, world size and process-group backend, start time
    metrics.jsonl      training metrics (``sessions.trainer``)
    checkpoint/        the trained model
    <arm>/             one evaluation per arm: probes.jsonl, sessions.jsonl,
                       retrievals.jsonl, store/ (the LMDB + FAISS trace store), summary.json
    summary.json       results only (no timings, no paths): same config + seed, same bytes
    report.md, *.png   tables and plots (``sessions.report``)

Every JSON file is written to a temporary name and renamed into place. In a distributed
job (torchrun) only rank 0 creates the folder and writes (``start_run``).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

PACKAGES = ("torch", "triton", "numpy", "faiss-cpu", "faiss-gpu-cu12", "lmdb",
            "sentence-transformers", "safetensors", "matplotlib", "transformers")
ROOT = Path(__file__).resolve().parent.parent


def git_state() -> tuple[str, bool]:
    """(HEAD sha or "unknown", whether the tree has uncommitted changes). ``BENCH_GIT_SHA``
    overrides it for a clean copy of the tree whose ``.git`` is absent or stale (the GPU
    machine's): the caller states the commit the copy was made from."""
    if os.environ.get("BENCH_GIT_SHA"):
        return os.environ["BENCH_GIT_SHA"], False
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, text=True,
                                    capture_output=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return sha, dirty


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def portable(arg: str) -> str:
    """A command-line argument with this checkout's absolute path taken out: a path inside the
    repository (also as ``key=PATH``) becomes relative to its root, one beside it ``../...``,
    so recorded commands name no machine's folders."""
    key, sep, value = ("", "", arg) if arg.startswith("/") else arg.partition("=")
    for root, prefix in ((ROOT, ""), (ROOT.parent, "../")):
        if value.startswith(f"{root}/"):
            return key + sep + prefix + value[len(f"{root}/"):]
    return arg


def mem_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None


def environment(seeds: list[int] | None = None, command: list[str] | None = None
                ) -> dict[str, Any]:
    """Where and how a result was produced."""
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    gpu, device_count = None, 0
    try:
        import torch

        if torch.cuda.is_available():
            gpu, device_count = torch.cuda.get_device_name(0), torch.cuda.device_count()
    except ImportError:
        pass
    from sessions.distributed import context

    sha, dirty = git_state()
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": sha, "git_dirty": dirty,
            "command": [portable(a) for a in (command or sys.argv)],
            "seeds": seeds, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "backend": context().backend,  # None: one process
            "host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "mem_gib": mem_gib(), "gpu": gpu, "gpus": device_count,
            "python": platform.python_version(), "versions": versions}


def write_json(path: Path, data: Any) -> Path:
    """Atomically write ``data`` as JSON (sorted keys: the same data, the same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_yaml(path: Path, data: Any) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def start_run(folder: Path, config: dict, seeds: list[int] | None = None) -> Path:
    """Create the folder, write ``config.yaml`` and ``env.json`` (rank 0 of a distributed job;
    the other ranks write nothing)."""
    from sessions.distributed import is_main

    folder = Path(folder)
    if not is_main():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    write_yaml(folder / "config.yaml", config)
    write_json(folder / "env.json", environment(seeds))
    return folder
