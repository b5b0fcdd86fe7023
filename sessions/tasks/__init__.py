"""Built-in multi-session tasks, one module each, behind one protocol (``Task``).

A task makes ``Episode``s (``sessions.episodes``) as a pure function of its config, the split
(``train`` | ``eval``), a seed and an index, and knows nothing about training. A task is named
in an experiment's ``task:`` section, e.g. ``{name: recall, n_sessions: 5}``; the other keys
are the task dataclass's fields (unknown ones are errors naming the field).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Protocol

from sessions.episodes import Episode
from sessions.tasks.episodes_file import EpisodesFileTask
from sessions.tasks.locomo import LocomoTask
from sessions.tasks.plays import PlaysTask
from sessions.tasks.reasoning import ReasoningTask
from sessions.tasks.recall import RecallTask

TASKS = {"recall": RecallTask, "episodes": EpisodesFileTask, "plays": PlaysTask,
         "reasoning": ReasoningTask, "locomo": LocomoTask}


class Task(Protocol):
    name: str
    score_context: bool  # whether the context segments' bits/byte are measured

    def episode(self, split: str, seed: int, index: int) -> Episode: ...


def task_fields(cls) -> dict:
    return {f.name: f for f in fields(cls) if not f.name.startswith("_")}


def build_task(spec: dict) -> Task:
    """A task from ``{"name": ..., **fields}``."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"task: expected a mapping with a name (one of {sorted(TASKS)})")
    name = spec["name"]
    if name not in TASKS:
        raise ValueError(f"task.name: unknown task {name!r}; one of {sorted(TASKS)}")
    cls = TASKS[name]
    known = task_fields(cls)
    params = {k: v for k, v in spec.items() if k != "name"}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"task.{unknown[0]}: not a field of the {name} task "
                         f"(fields: {sorted(known)})")
    return cls(**params)


def task_spec(task: Task) -> dict:
    """The resolved ``task:`` section of a task (every field, defaults included)."""
    return {"name": task.name, **{k: getattr(task, k) for k in task_fields(type(task))}}
