"""Reuse of the model's own worked solutions: multi-digit addition with worked column steps.

An episode of two sessions:
  * ``s1`` poses ``problems`` additions and asks the model to *generate* the worked solution
    of each (``Session.generate``): the runner decodes greedily and ``prompt + generation``
    becomes a context segment of s1 — the model's own solution, right or wrong, is what the
    write policy may persist. Training uses the reference solution as that segment (and
    learns to write it: ``train_context``).
  * ``s2`` poses the same problems rephrased — another wording, the operands in the other
    order — and asks for the final answer only (probes; evidence: the s1 generation).

Reference worked solution of ``284 + 637``::

    add 284 and 637 by columns 4+7, 8+3, 2+6.\\n      (the prompt: a worksheet layout)
    4+7=11, 8+3+1=12, 2+6+1=9, answer: 921\\n         (reference + stop)

The worksheet prompt lists the digit columns, units first, so writing the steps needs no
search for the i-th digit of a number (measured: the tiny model trained for 200 steps on the
plain ``add 284 and 637.`` prompt copied the right operand digit 25% of the time, teacher
forced, and none of its 60 generations was right); carrying, adding and composing the
answer remain the model's work. The later question has no columns: without memory the model
must add in one go.

Problems are split by problem: the unordered pair {a, b} is an evaluation problem when
``crc32("a,b") % 5 == 0`` (a fifth of all pairs), a training problem otherwise, so no
evaluation problem is ever trained on. Episodes are pure functions of (config, split, seed,
index). Probe tags: ``form`` (which rephrasing), ``carries`` (column carries in the problem).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from sessions.episodes import Episode, Generate, Probe, Session, segment_id

MAX_DIGITS = 6
PROMPT = "add {a} and {b} by columns {columns}.\n"
QUESTIONS = ("what is {b} plus {a}? final answer: ", "{b} + {a} = ",
             "the sum of {b} and {a} is ")


def is_eval_problem(a: int, b: int) -> bool:
    """The fixed train/eval split of problems (unordered operand pairs)."""
    lo, hi = sorted((a, b))
    return zlib.crc32(f"{lo},{hi}".encode()) % 5 == 0


def columns(a: int, b: int, digits: int) -> list[tuple[int, int]]:
    """The digit pairs of ``a + b``, units first."""
    da, db = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
    return [(int(x), int(y)) for x, y in zip(da, db, strict=True)]


def prompt(a: int, b: int, digits: int) -> str:
    return PROMPT.format(a=a, b=b, columns=", ".join(f"{x}+{y}" for x, y in
                                                     columns(a, b, digits)))


def worked_solution(a: int, b: int, digits: int) -> tuple[str, int]:
    """(column-by-column solution ending with ``answer: <a+b>``, number of carries)."""
    steps, carry, carries = [], 0, 0
    for x, y in columns(a, b, digits):
        total = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
        carries += carry
    return ", ".join(steps) + f", answer: {a + b}", carries


@dataclass(frozen=True)
class ReasoningTask:
    digits: int = 3
    problems: int = 3  # problems per episode (the later session asks all of them)

    name = "reasoning"
    score_context = False  # probes are the measure; the generations are not scored as text
    train_context = True  # training learns to write the worked solutions

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= MAX_DIGITS:
            raise ValueError(f"ReasoningTask.digits: 1..{MAX_DIGITS}")
        if self.problems < 1:
            raise ValueError("ReasoningTask.problems: must be >= 1")

    def _pair(self, rng: random.Random, split: str) -> tuple[int, int]:
        lo, hi = 10 ** (self.digits - 1), 10 ** self.digits - 1
        while True:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if is_eval_problem(a, b) == (split == "eval"):
                return a, b

    def episode(self, split: str, seed: int, index: int) -> Episode:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be train or eval, got {split!r}")
        rng = random.Random(f"reasoning:{split}:{seed}:{index}")
        pairs = []
        while len(pairs) < self.problems:
            pair = self._pair(rng, split)
            if pair not in pairs and pair[::-1] not in pairs:
                pairs.append(pair)
        asks, probes = [], []
        for i, (a, b) in enumerate(pairs):
            steps, carries = worked_solution(a, b, self.digits)
            asks.append(Generate(prompt(a, b, self.digits), steps, f"answer: {a + b}",
                                 max_bytes=len(steps) + 16, stop="\n"))
            form = rng.randrange(len(QUESTIONS))
            probes.append(Probe(QUESTIONS[form].format(a=a, b=b), str(a + b),
                                (segment_id("s1", i),), {"form": form, "carries": carries}))
        order = list(range(len(probes)))
        rng.shuffle(order)
        return Episode(f"{self.name}-{split}-{seed}-{index}", (
            Session("s1", generate=tuple(asks)),
            Session("s2", probes=tuple(probes[i] for i in order))))
