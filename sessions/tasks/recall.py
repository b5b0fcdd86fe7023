"""Cross-session recall: facts (4-digit locker codes) are stated in session 1 among
distractor notes; session 2 asks for one of them. Without memory the code is a 1-in-10,000
guess; with memory the model must retrieve the right trace and copy its digits.

Every episode is a namespace with two sessions. Segments are fixed-width byte strings:
    fact:        "the code for locker QX is 4829."
    distractor:  "the ferry to oslo left late on day 17."
    question:    "the code for locker QX is 4829."   (the 4 digits are the answer)
Training and evaluation draw locker names from disjoint sets and codes at random, so no
evaluation fact was seen in training. Episodes are a pure function of (seed, index).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import torch

SEGMENT_LEN = 40
_CITIES = ["oslo", "lima", "rome", "kyiv", "doha", "baku", "riga", "bern", "nice", "pune"]
_THINGS = ["ferry", "train", "bus", "plane", "tram", "boat"]
_WEATHER = ["mild", "cold", "wet", "windy", "bright", "grey"]
_ALL_NAMES = [a + b for a in string.ascii_uppercase for b in string.ascii_uppercase]
# Every fifth name is reserved for evaluation: evaluation facts are never seen in training.
EVAL_NAMES = _ALL_NAMES[::5]
TRAIN_NAMES = [n for i, n in enumerate(_ALL_NAMES) if i % 5]


@dataclass
class RecallBatch:
    write_BNS: torch.Tensor  # session-1 segments (int64 bytes)
    is_fact_BN: torch.Tensor  # which session-1 segments state a fact
    question_BS: torch.Tensor  # session-2 segment (inputs, with its targets below)
    targets_BS: torch.Tensor
    answer_pos_B4: torch.Tensor  # input positions whose next byte is an answer digit
    asked_BN: torch.Tensor  # the fact segment the question is about (one-hot)


def _pad(text: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > SEGMENT_LEN:
        raise ValueError(f"segment longer than {SEGMENT_LEN}: {text!r}")
    return raw + b" " * (SEGMENT_LEN - len(raw))


def fact_text(name: str, code: str) -> str:
    return f"the code for locker {name} is {code}."


def distractor_text(rng: random.Random) -> str:
    kind = rng.randrange(2)
    if kind == 0:
        return (f"the {rng.choice(_THINGS)} to {rng.choice(_CITIES)} left late "
                f"on day {rng.randint(1, 28)}.")
    return f"the weather in {rng.choice(_CITIES)} was {rng.choice(_WEATHER)} today."


@dataclass
class RecallTask:
    n_facts: int = 3
    n_distractors: int = 7
    split: str = "train"  # train | eval
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval"):
            raise ValueError(f"RecallTask.split must be train or eval, got {self.split!r}")
        if self.n_facts < 1 or self.n_distractors < 0:
            raise ValueError("RecallTask.n_facts must be >= 1 and n_distractors >= 0")

    @property
    def n_segments(self) -> int:
        return self.n_facts + self.n_distractors

    def episode(self, index: int) -> dict:
        rng = random.Random(f"recall:{self.split}:{self.seed}:{index}")
        names = rng.sample(TRAIN_NAMES if self.split == "train" else EVAL_NAMES, self.n_facts)
        codes = [f"{rng.randrange(10_000):04d}" for _ in names]
        segments = [(fact_text(n, c), True) for n, c in zip(names, codes, strict=True)]
        segments += [(distractor_text(rng), False) for _ in range(self.n_distractors)]
        rng.shuffle(segments)
        asked = rng.randrange(self.n_facts)
        question = fact_text(names[asked], codes[asked])
        asked_slot = [t for t, _ in segments].index(question)
        return {"segments": segments, "question": question, "asked_slot": asked_slot,
                "name": names[asked], "code": codes[asked],
                "facts": list(zip(names, codes, strict=True))}

    def batch(self, start: int, size: int) -> RecallBatch:
        eps = [self.episode(start + i) for i in range(size)]
        write = torch.tensor([[list(_pad(t)) for t, _ in e["segments"]] for e in eps])
        is_fact = torch.tensor([[f for _, f in e["segments"]] for e in eps])
        full = torch.tensor([list(_pad(e["question"]) + b" ") for e in eps])
        answer_at = len(eps[0]["question"]) - 5  # first digit (all questions are equally long)
        answer_pos = torch.arange(answer_at - 1, answer_at + 3).expand(size, 4)
        asked = torch.zeros(size, self.n_segments, dtype=torch.bool)
        asked[torch.arange(size), torch.tensor([e["asked_slot"] for e in eps])] = True
        return RecallBatch(write, is_fact, full[:, :-1], full[:, 1:], answer_pos.clone(), asked)
