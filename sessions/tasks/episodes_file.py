"""Your own episodes as a task: JSONL files (format in ``sessions.episodes``), one for
training (optional: a run can load a trained checkpoint instead) and one for evaluation.

Training cycles through the file in an order shuffled by the seed; evaluation takes the
file's episodes in order. Files are read and validated once, when the task is made.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from sessions.episodes import Episode, read_episodes


@dataclass(frozen=True)
class EpisodesFileTask:
    train: str = ""  # JSONL of training episodes ("" = none: load a checkpoint instead)
    eval: str = ""  # JSONL of evaluation episodes
    score_context: bool = False  # also report bits/byte of the context segments

    name = "episodes"
    _loaded: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.train and not self.eval:
            raise ValueError("EpisodesFileTask: give task.train and/or task.eval (JSONL files)")
        for split in ("train", "eval"):
            path = getattr(self, split)
            if path:
                self._loaded[split] = read_episodes(path)

    def count(self, split: str) -> int | None:
        return len(self._episodes(split))

    def _episodes(self, split: str) -> list[Episode]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be train or eval, got {split!r}")
        if split not in self._loaded:
            raise ValueError(f"task.{split} is not set: this task has no {split} episodes file")
        return self._loaded[split]

    def episode(self, split: str, seed: int, index: int) -> Episode:
        eps = self._episodes(split)
        if split == "eval":
            if not 0 <= index < len(eps):
                raise IndexError(f"{self.eval} has {len(eps)} episodes, asked for #{index}")
            return eps[index]
        lap, pos = divmod(index, len(eps))
        order = list(range(len(eps)))
        random.Random(f"episodes:{seed}:{lap}").shuffle(order)
        return eps[order[pos]]
