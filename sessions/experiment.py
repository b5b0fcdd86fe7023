"""Experiment configuration: one YAML file (``configs/experiments/*.yaml``) maps onto
``ExperimentConfig`` — the model and its training (the same dataclasses as ``engram train``),
the Engram module, the task, evaluation, ablation and the training objective::

    name: recall5
    preset: tiny                 # model/train defaults from an mHC preset
    model: {seq_len: 64}
    train: {steps: 1200, batch_size: 8}
    engram: {enabled: true, write_budget: 0.3}
    task: {name: recall, n_sessions: 5, paraphrase: true}
    eval_task: {distractors_per_session: 7}   # task fields that differ when evaluating
    eval: {episodes: 200}
    ablate: {arms: [off, trained-off, on:random, on, on:all], seeds: [0, 1, 2]}

``key=value`` overrides address the resolved config (``train.steps=50``,
``task.n_sessions=3``, ``engram.top_k=8``, ``ablate.seeds=[0,1]``); a key that is not part of
it is an error, so no override is ever silently ignored. The memory flag lives in
``engram.enabled`` / ``engram.read`` and is resolved once, by ``engram.config.resolve``
(``--memory`` wins over ``ENGRAM_ENABLED``, which wins over the file).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from engram.config import MEMORY_MODES, WRITE_POLICIES, EngramConfig
from mhc import presets
from mhc.config import ModelConfig, TrainConfig
from sessions.tasks import TASKS, build_task, task_fields, task_spec

# Train fields an experiment does not use, and what to use instead.
NOT_IN_EXPERIMENTS = {"data": "the task section sets the data",
                      "out_dir": "use --out DIR (default runs/<name>)"}
SECTIONS = ("model", "train", "engram", "task", "eval_task", "eval", "ablate", "objective")


def parse_arm(arm: str) -> tuple[str, str | None]:
    """``off`` | ``trained-off`` | ``on`` | ``on:<write policy>`` | ``knn`` -> (memory, policy).
    ``knn`` is the memory model reading every token of earlier sessions (``engram.knn_memory``:
    no write policy, no compression)."""
    if arm == "knn":
        return "on", "all"
    if not isinstance(arm, str):
        raise ValueError(f"arm {arm!r}: expected a string such as off, trained-off, on:random")
    memory, _, policy = arm.partition(":")
    if memory not in MEMORY_MODES or (policy and (memory != "on" or policy not in
                                                  WRITE_POLICIES)):
        raise ValueError(f"arm {arm!r}: expected off, trained-off, on, on:<policy> with "
                         f"policy in {WRITE_POLICIES}, or knn")
    return memory, policy or None


@dataclass
class EvalConfig:
    episodes: int = 200  # evaluation episodes (0 = every episode of an episodes file)
    batch_size: int = 25  # episodes evaluated side by side
    seed: int = 10_000  # the evaluation episodes' seed: the same for every training seed
    backend: str = "store"  # store: the real LMDB + FAISS store | tensor: in-RAM tensors
    read_scope: str = "earlier"  # earlier: every earlier session | previous: the one before
    compare_off: bool = True  # `engram run` also scores its memory model with reads off
    episodes_file: str = ""  # evaluate on these JSONL episodes instead of the task's eval split

    def __post_init__(self) -> None:
        if self.episodes < 0 or self.batch_size < 1:
            raise ValueError("EvalConfig.episodes must be >= 0 and batch_size >= 1")
        if self.backend not in ("store", "tensor"):
            raise ValueError(f"EvalConfig.backend: store or tensor, got {self.backend!r}")
        if self.read_scope not in ("earlier", "previous"):
            raise ValueError(f"EvalConfig.read_scope: earlier or previous, got {self.read_scope!r}")


@dataclass
class AblateConfig:
    arms: list[str] = field(default_factory=lambda: ["off", "trained-off", "on:random", "on",
                                                     "on:all"])
    seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("AblateConfig.arms: at least one arm")
        # YAML 1.1 reads bare on/off as booleans
        self.arms = ["on" if a is True else "off" if a is False else a for a in self.arms]
        for a in self.arms:
            parse_arm(a)
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                     for s in self.seeds):
            raise ValueError(f"AblateConfig.seeds: a non-empty list of ints, got {self.seeds!r}")


@dataclass
class ObjectiveConfig:
    """The episode training loss: LM loss on every probe token + ``answer_weight`` × answer
    loss (+ the context's LM loss when the task scores context) + router and write-gate
    losses. Training writes every segment softly (values scaled by σ(salience))."""

    answer_weight: float = 1.0
    retrieve_all: bool = True  # train reading every eligible trace (top-k only at evaluation)
    write_backprop: bool = False  # backprop through the backbone's write pass (~3x the cost)
    # CUDA: replay that write pass (without write_backprop) from CUDA graphs captured per
    # batch shape (sessions.graph_write); false runs it eagerly
    graph_write: bool = True
    probes_per_episode: int = 0  # > 0: score this many probes per episode and step (0: all)
    # a probe tag (e.g. "distance"): sample the probes so that every value of the tag in a
    # batch is equally likely (rare values, e.g. facts 4 sessions back, are trained as often)
    balance_probes_by: str = ""

    def __post_init__(self) -> None:
        if self.answer_weight < 0:
            raise ValueError("ObjectiveConfig.answer_weight: must be >= 0")
        if self.probes_per_episode < 0:
            raise ValueError("ObjectiveConfig.probes_per_episode: must be >= 0")
        if self.balance_probes_by and not self.probes_per_episode:
            raise ValueError("ObjectiveConfig.balance_probes_by: needs probes_per_episode > 0 "
                             "(it chooses which probes are sampled)")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engram: EngramConfig = field(default_factory=EngramConfig)
    task: dict = field(default_factory=lambda: {"name": "recall"})
    eval_task: dict = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def make_task(self, split: str = "train"):
        """The task for ``split`` (evaluation applies ``eval_task`` on top)."""
        return build_task({**self.task, **(self.eval_task if split == "eval" else {})})

    @property
    def memory(self) -> str:
        """The arm this config runs: ``off`` | ``trained-off`` | ``on``."""
        if not self.engram.enabled:
            return "off"
        return "on" if self.engram.read else "trained-off"


# ---- plain dicts, YAML and overrides ---------------------------------------------------
def to_plain(exp: ExperimentConfig) -> dict:
    """Every field resolved (task defaults included): what ``config.yaml`` holds."""
    train = asdict(exp.train)
    for key in NOT_IN_EXPERIMENTS:
        train.pop(key)
    return {"name": exp.name, "model": presets.to_plain(exp.model), "train": train,
            "engram": asdict(exp.engram), "task": task_spec(exp.make_task("train")),
            "eval_task": dict(exp.eval_task), "eval": asdict(exp.eval),
            "ablate": asdict(exp.ablate), "objective": asdict(exp.objective)}


def from_plain(data: dict, where: str = "experiment") -> ExperimentConfig:
    unknown = sorted(set(data) - {"name", *SECTIONS})
    if unknown:
        raise ValueError(f"{where}: unknown section {unknown[0]!r}; known: name, "
                         f"{', '.join(SECTIONS)}")
    data = copy.deepcopy(data)
    train = data.get("train", {})
    for key, hint in NOT_IN_EXPERIMENTS.items():
        if key in train:
            raise ValueError(f"train.{key}: not used by experiments ({hint})")
    run = presets.build({"model": data.get("model", {}), "train": train})
    task = task_spec(build_task(data.get("task", {"name": "recall"})))  # every field
    eval_task = data.get("eval_task", {})
    cls = TASKS[task["name"]]
    bad = sorted(set(eval_task) - set(task_fields(cls)))
    if bad:
        raise ValueError(f"eval_task.{bad[0]}: not a field of the {task['name']} task")
    exp = ExperimentConfig(
        name=str(data.get("name", "experiment")), model=run.model, train=run.train,
        engram=_section(EngramConfig, data.get("engram", {}), "engram"), task=task,
        eval_task=eval_task, eval=_section(EvalConfig, data.get("eval", {}), "eval"),
        ablate=_section(AblateConfig, data.get("ablate", {}), "ablate"),
        objective=_section(ObjectiveConfig, data.get("objective", {}), "objective"))
    exp.make_task("eval")  # validates the evaluation task too
    return exp


def _section(cls, values: dict, name: str):
    if not isinstance(values, dict):
        raise ValueError(f"{name}: expected a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    values = dict(values)
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{name}.{key}: unknown field; known: {sorted(known)}")
        default = getattr(cls(), key)
        if isinstance(default, str) and isinstance(value, bool):  # YAML 1.1: off -> False
            values[key] = value = "on" if value else "off"
        _check_type(default, value, f"{name}.{key}")
    return cls(**values)


def _check_type(default: Any, value: Any, where: str) -> None:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, int) and not isinstance(default, bool):
            ok = ok and isinstance(value, int)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise ValueError(f"{where}: expected {type(default).__name__}, got {value!r}")


def apply_overrides(plain: dict, overrides: list[str]) -> dict:
    """``section.key=value`` on the resolved plain config; unknown keys are errors."""
    plain = copy.deepcopy(plain)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        value = presets._parse_value(text)
        node = plain
        for part in path[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"override {key!r}: {part!r} is not a section of the "
                                 f"experiment ({', '.join(SECTIONS)})")
            node = node[part]
        last = path[-1]
        if isinstance(node, dict) and isinstance(node.get(last), str):
            value = text  # a string field takes the text as written (YAML reads off as False)
        if path[0] == "eval_task" and len(path) == 2:
            node[last] = value  # any field of the task (checked when the config is built)
            continue
        if not isinstance(node, dict) or last not in node:
            hint = f" ({NOT_IN_EXPERIMENTS[last]})" if path == ["train", last] and \
                last in NOT_IN_EXPERIMENTS else ""
            raise ValueError(f"override {key!r}: no such key in the experiment config{hint}")
        if isinstance(node[last], float) and isinstance(value, int):
            value = float(value)
        node[last] = value
    return plain


def load_experiment(source: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """An experiment YAML file (``preset:`` names the model/train defaults), then overrides."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file {source} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping at the top level")
    base = raw.pop("preset", None)
    if base is not None:
        if base not in presets.PRESETS:
            raise ValueError(f"{source}: preset {base!r} unknown; one of {list(presets.PRESETS)}")
        preset = copy.deepcopy(presets.PRESETS[base])
        preset.get("train", {}).pop("out_dir", None)
        raw = presets._merge(preset, raw)
    exp = from_plain(raw, str(source))
    if overrides:
        exp = from_plain(apply_overrides(to_plain(exp), overrides), str(source))
    return exp


def is_experiment_file(source: str) -> bool:
    """Whether ``source`` is an experiment YAML (it has a ``task`` section)."""
    path = Path(source)
    if not path.is_file() or path.suffix not in (".yaml", ".yml"):
        return False
    raw = yaml.safe_load(path.read_text()) or {}
    return isinstance(raw, dict) and "task" in raw


def with_seed(exp: ExperimentConfig, seed: int) -> ExperimentConfig:
    return replace(exp, train=replace(exp.train, seed=seed))
