"""Checkpoints: ``model.safetensors`` + ``optimizer.safetensors`` + ``config.json``.

``config.json`` holds the step, ``kind`` (``backbone``: an ``engram train`` run on text
streams, ``config`` is the ``RunConfig``; ``experiment``: a model trained on episodes,
``config`` is the resolved ``ExperimentConfig``) and whatever the trainer adds.

Each file is written to a temporary name and renamed into place, the JSON last, so a folder
whose ``config.json`` names step N holds a complete step-N checkpoint. The step is also stored
in both safetensors headers and checked on load.

The files hold the full state whatever the world size that trained it (``sessions.distributed``
gathers a sharded model to rank 0 and writes these same files), so a checkpoint resumes on any
number of ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model

from mhc import presets
from mhc.config import RunConfig


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or inconsistent."""


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def save(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | dict | None,
         config: dict, step: int, extra: dict | None = None, kind: str = "backbone") -> Path:
    """``config``: the plain (JSON) config of the run; ``optimizer``: an optimizer or its
    state dict (``sessions.distributed`` gathers a sharded one into ``torch.optim``'s layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"step": str(step)}
    tmp = folder / "model.safetensors.tmp"
    save_model(model, str(tmp), metadata=meta)
    _replace(tmp, folder / "model.safetensors")
    if optimizer is not None:
        tensors, groups = _flatten_optimizer(optimizer)
        tmp = folder / "optimizer.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={**meta, "param_groups": json.dumps(groups)})
        _replace(tmp, folder / "optimizer.safetensors")
    info = {"step": step, "kind": kind, "config": config, **(extra or {})}
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    _replace(tmp, folder / "config.json")
    return folder


def _flatten_optimizer(optimizer) -> tuple[dict, list]:
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors = {}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def read_info(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a checkpoint folder)")
    return json.loads(path.read_text())


def load_run_config(folder: Path) -> RunConfig:
    """The model + training config of any checkpoint."""
    cfg = read_info(folder)["config"]
    return presets.build({"model": cfg["model"], "train": cfg["train"]})


def load_experiment_config(folder: Path):
    """The ``ExperimentConfig`` of a checkpoint trained on episodes."""
    from sessions.experiment import from_plain

    info = read_info(folder)
    if info.get("kind") != "experiment":
        raise CheckpointError(f"{folder}: a backbone checkpoint (engram train on text), not "
                              "one trained on episodes (engram train|run EXPERIMENT.yaml)")
    return from_plain(info["config"], str(folder))


def weights_file(folder: Path) -> tuple[Path, int]:
    """A checkpoint's ``model.safetensors`` and its step (checked against ``config.json``)."""
    folder = Path(folder)
    step = int(read_info(folder)["step"])
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder}: model.safetensors missing")
    _check_step(weights, step)
    return weights, step


# Before the FFNs fused their gate and up projections into one weight ([gate | up] along the
# last dim), checkpoints held the two halves: (gate name, up name) -> fused name.
_SPLIT_GATE_UP = {(".w_gate_PDF", ".w_up_PDF"): ".w_gate_up_PDH",
                  (".w_gate", ".w_up"): ".w_gate_up"}


def _fused_gate_up(folder: Path, weights: Path, model: torch.nn.Module, missing: list[str],
                   unexpected: list[str]) -> bool:
    """Load the split gate/up weights of an older checkpoint into the fused ones; True when
    that accounts for every missing and unexpected name (the model is then fully loaded)."""
    fused, used = {}, set()
    with safe_open(str(weights), framework="pt") as f:
        for (gate, up), new in _SPLIT_GATE_UP.items():
            for name in missing:
                if name.endswith(new):
                    stem = name[: -len(new)]
                    pair = (stem + gate, stem + up)
                    if all(p in unexpected for p in pair):
                        fused[name] = torch.cat([f.get_tensor(p) for p in pair], -1)
                        used.update(pair)
    if set(fused) != set(missing) or used != set(unexpected):
        return False
    state = model.state_dict()
    with torch.no_grad():
        for name, t in fused.items():
            if t.shape != state[name].shape:
                raise CheckpointError(f"{folder}: {name} is {tuple(state[name].shape)} in the "
                                      f"model, its split halves make {tuple(t.shape)}")
            state[name].copy_(t)
    return True


def load(folder: Path, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load weights (and optimizer state) in place; returns the step. Weights saved before
    the gate/up fusion load too; their optimizer state does not (another parameter list)."""
    weights, step = weights_file(folder)
    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        if not _fused_gate_up(folder, weights, model, missing, unexpected):
            raise CheckpointError(f"{folder}: weights do not match the model "
                                  f"(missing {missing}, unexpected {unexpected})")
        if optimizer is not None:
            raise CheckpointError(
                f"{folder}: written before the FFNs fused their gate and up weights; its "
                "weights load (evaluation, queries), but its optimizer state holds them as two "
                "parameters and cannot resume this run")
    if optimizer is not None:
        optimizer.load_state_dict(load_optimizer_state(folder))
    return step


def load_optimizer_state(folder: Path) -> dict:
    """The optimizer state of a checkpoint in ``torch.optim``'s layout (parameters numbered
    in group order)."""
    folder = Path(folder)
    path = folder / "optimizer.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{folder}: optimizer.safetensors missing (cannot resume)")
    _check_step(path, int(read_info(folder)["step"]))
    return _unflatten_optimizer(path)


def _check_step(path: Path, step: int) -> None:
    with safe_open(str(path), framework="pt") as f:
        found = int((f.metadata() or {}).get("step", -1))
    if found != step:
        raise CheckpointError(f"{path} is from step {found}, config.json says {step}")


def _unflatten_optimizer(path: Path) -> dict:
    state: dict[int, dict] = {}
    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        for key in f.keys():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = f.get_tensor(key)
    return {"state": state, "param_groups": groups}
