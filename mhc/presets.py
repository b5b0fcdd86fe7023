"""Named presets, YAML config files and ``key=value`` overrides, all mapping onto the same
dataclasses (``RunConfig`` → ``ModelConfig`` → ``FFNConfig``, and ``TrainConfig``).

    tiny   CPU in minutes: 4 layers, d 128, hierarchical 4 domains × 4 components, k 1×2
    small  one GPU: 8 layers, d 512, hierarchical 8 × 8, k 2×2
    debug  tests: 2 layers, d 32, a handful of steps
"""

from __future__ import annotations

import copy
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from mhc.config import FFNConfig, ModelConfig, RunConfig, TrainConfig

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {
            "d_model": 128, "n_layers": 4, "n_heads": 4, "seq_len": 128,
            "ffn": {"kind": "hierarchical", "hidden": 256, "n_domains": 4, "n_components": 4,
                    "k1": 1, "k2": 2, "segment_len": 32},
        },
        "train": {"steps": 3000, "batch_size": 32, "lr": 3e-3, "warmup_steps": 100,
                  "eval_every": 500, "checkpoint_every": 1000, "max_minutes": 9.5,
                  "out_dir": "runs/tiny"},
    },
    "small": {
        "model": {
            "d_model": 512, "n_layers": 8, "n_heads": 8, "seq_len": 512,
            "ffn": {"kind": "hierarchical", "hidden": 512, "n_domains": 8, "n_components": 8,
                    "k1": 2, "k2": 2, "segment_len": 128},
        },
        "train": {"steps": 5000, "batch_size": 32, "lr": 1e-3, "warmup_steps": 200,
                  "out_dir": "runs/small"},
    },
    "debug": {
        "model": {
            "d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32,
            "ffn": {"kind": "hierarchical", "hidden": 32, "n_domains": 2, "n_components": 3,
                    "k1": 1, "k2": 2, "segment_len": 16},
        },
        "train": {"steps": 20, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                  "eval_every": 10, "eval_batches": 2, "log_every": 5, "checkpoint_every": 10,
                  "data": "synthetic", "out_dir": "runs/debug"},
    },
}

_SECTIONS = {RunConfig: {"model": ModelConfig, "train": TrainConfig},
             ModelConfig: {"ffn": FFNConfig}}


def _check_keys(cls, data: dict, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    for key, sub in _SECTIONS.get(cls, {}).items():
        if key in data:
            if not isinstance(data[key], dict):
                raise ValueError(f"{where}.{key}: expected a mapping, got {data[key]!r}")
            _check_keys(sub, data[key], f"{where}.{key}")


def build(data: dict) -> RunConfig:
    """A validated ``RunConfig`` from a nested dict (unknown keys are errors)."""
    _check_keys(RunConfig, data, "config")
    data = copy.deepcopy(data)
    _check_types(RunConfig, data, "config")
    model = dict(data.get("model", {}))
    ffn = FFNConfig(**model.pop("ffn", {}))
    return RunConfig(model=ModelConfig(ffn=ffn, **model),
                     train=TrainConfig(**data.get("train", {})))


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    value = yaml.safe_load(text)
    return text if value is None and text not in ("null", "~") else value


def _check_types(cls, data: dict, where: str) -> None:
    """Scalar fields must get values of the default's type (ints are accepted as floats)."""
    defaults = {f.name: getattr(cls(), f.name) for f in fields(cls)} if cls is not RunConfig \
        else {}
    for key, value in data.items():
        if key in _SECTIONS.get(cls, {}):
            _check_types(_SECTIONS[cls][key], value, f"{where}.{key}")
            continue
        default = defaults.get(key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                data[key] = float(value)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ValueError(f"{cls.__name__}.{key}: expected {type(default).__name__}, "
                             f"got {value!r}")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (``model.ffn.kind=dense``, ``train.steps=10``).
    A bare key is looked up in train, model, then model.ffn."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        if len(path) == 1:
            path = _find_bare_key(path[0])
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_value(text)
    return data


def _find_bare_key(key: str) -> list[str]:
    for path, cls in ((["train"], TrainConfig), (["model"], ModelConfig),
                      (["model", "ffn"], FFNConfig)):
        if key in {f.name for f in fields(cls)}:
            return [*path, key]
    raise ValueError(f"override key {key!r} is not a field of train, model or model.ffn")


def load(source: str, overrides: list[str] | None = None) -> RunConfig:
    """A preset name (``tiny``), or a YAML file path; then overrides. A YAML file may name a
    preset to start from with ``preset: NAME``."""
    if source in PRESETS:
        data = copy.deepcopy(PRESETS[source])
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"config {source!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: expected a mapping at the top level")
        base = raw.pop("preset", None)
        if base is not None and base not in PRESETS:
            raise ValueError(f"{source}: preset {base!r} unknown; one of {list(PRESETS)}")
        data = _merge(copy.deepcopy(PRESETS[base]) if base else {}, raw)
    return build(apply_overrides(data, overrides or []))


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def to_plain(obj: Any) -> Any:
    """Dataclass → plain dict (for JSON next to checkpoints)."""
    if is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    return obj
