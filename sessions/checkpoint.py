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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file, save_model

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
# last dim), checkpoints held the two halves: fused name -> (gate name, up name).
_SPLIT_GATE_UP = {".w_gate_up_PDH": (".w_gate_PDF", ".w_up_PDF"),
                  ".w_gate_up": (".w_gate", ".w_up")}


@dataclass(frozen=True)
class WeightPlan:
    """Where each tensor of a model lies in a checkpoint's ``model.safetensors``. It is made
    from the file's header alone, so a mismatch is reported before anything is loaded."""

    path: Path
    step: int
    # model name -> (its file name, or the (gate, up) halves it was saved as; rows of dim 0)
    sources: dict[str, tuple[tuple[str, ...], slice | None]]
    split: bool  # some weight is read from halves saved before the gate/up fusion

    def require_fused(self, folder: Path) -> None:
        """Refuse to resume (weights and optimizer state) from halves saved before the fusion:
        the optimizer state holds them as two parameters."""
        if self.split:
            raise CheckpointError(
                f"{folder}: written before the FFNs fused their gate and up weights; its "
                "weights load (evaluation, queries), but its optimizer state holds them as two "
                "parameters and cannot resume this run; nothing loaded")

    def load_into(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad(), safe_open(str(self.path), framework="pt") as f:
            for name, (files, rows) in self.sources.items():
                parts = [f.get_slice(n)[rows] if rows else f.get_tensor(n) for n in files]
                state[name].copy_(parts[0] if len(parts) == 1 else torch.cat(parts, -1))


def _as_saved(name: str, t: torch.Tensor) -> tuple[str, tuple[int, ...], slice | None]:
    return name, tuple(t.shape), None


def plan_weights(folder: Path, state: dict[str, torch.Tensor], as_saved=_as_saved) -> WeightPlan:
    """Match a model's ``state`` to a checkpoint's weights. ``as_saved(name, tensor)`` gives
    the name and shape the file holds the tensor under and the rows of it that are the
    tensor (an expert-parallel rank's slice), or None for all. Tensors that share storage
    (tied weights) are saved once, under any of their names. Raises ``CheckpointError``
    naming every missing, unexpected or misshapen weight."""
    weights, step = weights_file(folder)
    with safe_open(str(weights), framework="pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    tied: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.data_ptr() else (name,)
        tied.setdefault(key, []).append(name)
    sources, used, missing, misshapen = {}, set(), [], []
    for names in tied.values():
        for name in names:
            saved, shape, rows = as_saved(name, state[name])
            files = (saved,) if saved in shapes else _split_halves(saved, shapes)
            if files:
                break
        else:
            missing.append(names[0])
            continue
        found = [shapes[n] for n in files]
        if len(found) == 2 and found[0][:-1] == found[1][:-1]:  # [gate | up]
            found = [found[0][:-1] + (found[0][-1] + found[1][-1],)]
        if found != [shape]:
            misshapen.append(f"{' + '.join(files)} is {' + '.join(map(str, found))} in the "
                             f"file, {shape} in the model")
        sources[name] = (files, rows)
        used.update(files)
    unexpected = sorted(set(shapes) - used)
    if missing or unexpected or misshapen:
        raise CheckpointError(f"{folder}: weights do not match the model (missing {missing}, "
                              f"unexpected {unexpected}, shapes {misshapen}); nothing loaded")
    split = any(len(files) == 2 for files, _ in sources.values())
    return WeightPlan(weights, step, sources, split)


def _split_halves(saved: str, shapes: dict) -> tuple[str, ...]:
    """The (gate, up) names a fused weight ``saved`` had before the fusion, where the file
    holds both; else ()."""
    for new, (gate, up) in _SPLIT_GATE_UP.items():
        if saved.endswith(new):
            halves = (saved[: -len(new)] + gate, saved[: -len(new)] + up)
            if all(h in shapes for h in halves):
                return halves
    return ()


def _moment_keys(optimizer: torch.optim.Optimizer) -> set[str]:
    """The per-parameter state an Adam-family optimizer needs to resume (others: none
    required)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return set()
    amsgrad = any(g.get("amsgrad") for g in optimizer.param_groups)
    return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())


def fit_optimizer_state(folder: Path, saved: dict, optimizer: torch.optim.Optimizer,
                        shapes: list[tuple[int, ...]] | None = None) -> dict:
    """``saved`` renumbered to its parameters' positions in group order (torch.optim's own
    matching, through the ids each saved group lists), or ``CheckpointError`` where it does
    not fit ``optimizer``: another grouping, state for a parameter no group lists, a missing
    moment (Adam family), or a moment of another shape than its parameter. ``shapes``: the
    parameters' shapes in group order as the state holds them (default: the optimizer's)."""
    def refuse(why: str):
        raise CheckpointError(f"{folder}: optimizer state {why}; nothing loaded")

    sizes = [len(g["params"]) for g in optimizer.param_groups]
    found = [len(g["params"]) for g in saved["param_groups"]]
    if found != sizes:
        refuse(f"has parameter groups of sizes {found}, this optimizer {sizes}")
    if shapes is None:
        shapes = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(set(ids)) != len(ids):
        refuse("lists a parameter id in more than one place")
    position = {i: n for n, i in enumerate(ids)}
    needed, state = _moment_keys(optimizer), {}
    for i, slots in saved["state"].items():
        if i not in position:
            refuse(f"holds parameter {i}, which none of its groups lists")
        n = position[i]
        if needed - set(slots):
            refuse(f"of parameter {i} lacks {sorted(needed - set(slots))}")
        for key, v in slots.items():
            if key != "step" and torch.is_tensor(v) and tuple(v.shape) != shapes[n]:
                refuse(f"{i}.{key} is {tuple(v.shape)}, its parameter {shapes[n]}")
        state[n] = slots
    groups = [dict(g, params=[position[i] for i in g["params"]]) for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


def load(folder: Path, model: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load weights (and optimizer state) in place; returns the step. Everything is checked
    before anything changes: a refused checkpoint leaves the model and optimizer as they
    were. Weights saved before the gate/up fusion load too; their optimizer state does not
    (another parameter list)."""
    state = model.state_dict()
    plan = plan_weights(folder, state)
    if optimizer is not None:
        plan.require_fused(folder)
        saved = fit_optimizer_state(folder, load_optimizer_state(folder), optimizer)
    plan.load_into(state)  # weights first: the optimizer's load cannot fail after the fit
    if optimizer is not None:
        optimizer.load_state_dict(saved)
    return plan.step


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
