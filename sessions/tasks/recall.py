"""Cross-session recall: facts (4-digit locker codes) are stated across sessions among
distractor notes, some are *updated* in a later session, and later sessions ask for them.
Without memory a code is a 1-in-10,000 guess; with memory the model must retrieve the right
trace — the newest one for an updated fact — and copy its digits.

An episode of ``n_sessions`` sessions ``s1 .. sN``:
  * sessions s1 .. s(N-1) each state ``facts_per_session`` new facts and, from s2 on,
    ``updates_per_session`` new values of facts stated earlier, shuffled among
    ``distractors_per_session`` notes (some mention lockers, none gives a code);
  * the last session holds distractors only;
  * every session s ≥ s2 asks, for each earlier session j, ``questions_per_session``
    question(s) about a fact first stated in j; the right answer is its newest value stated
    before s. Probe tags: ``distance`` (sessions between the answering statement and the
    question), ``updated`` (whether that statement was an update), ``fact_session``.
With ``paraphrase`` the facts and the questions use several wordings, never the fact's own
string as the question; without it (the original two-session task) the question is the
fact's sentence up to the code.

Training and evaluation draw locker names from disjoint sets and codes at random, so no
evaluation fact was seen in training. Episodes are a pure function of (config, split, seed,
index). Both name sets are closed under reversal (LJ and JL are both evaluation names), and
evaluation's is 4× smaller, so an episode's names are 4× more often anagrams of each other
in evaluation than in training. ``train_pool="eval_size"`` draws each training episode's
names from a random pool of evaluation's size and make-up (reversal pairs and doubled
letters), so training meets such pairs as often as evaluation does.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from sessions.episodes import Episode, Probe, Session, segment_id

_CITIES = ["oslo", "lima", "rome", "kyiv", "doha", "baku", "riga", "bern", "nice", "pune"]
_THINGS = ["ferry", "train", "bus", "plane", "tram", "boat"]
_WEATHER = ["mild", "cold", "wet", "windy", "bright", "grey"]
_COLOURS = ["red", "blue", "green", "white", "black", "yellow"]
_ALL_NAMES = [a + b for a in string.ascii_uppercase for b in string.ascii_uppercase]
# Every fifth name is reserved for evaluation: evaluation facts are never seen in training.
EVAL_NAMES = _ALL_NAMES[::5]
TRAIN_NAMES = [n for i, n in enumerate(_ALL_NAMES) if i % 5]
TRAIN_POOLS = ("all", "eval_size")


def _reversal_classes(names: list[str]) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """``names`` as reversal pairs (``AB``, ``BA``) and doubled letters (``AA``)."""
    pairs = sorted({tuple(sorted((n, n[::-1]))) for n in names if n != n[::-1]})
    assert {n for p in pairs for n in p} <= set(names), "name set not closed under reversal"
    return pairs, [(n,) for n in names if n == n[::-1]]


# made once: every training episode draws from them
_EVAL_CLASSES, _TRAIN_CLASSES = _reversal_classes(EVAL_NAMES), _reversal_classes(TRAIN_NAMES)


def _eval_sized_pool(rng: random.Random) -> list[str]:
    """Training names with the make-up of ``EVAL_NAMES``: as many reversal pairs and
    doubled-letter names, drawn at random."""
    (ep, es), (tp, ts) = _EVAL_CLASSES, _TRAIN_CLASSES
    return [n for c in rng.sample(tp, len(ep)) + rng.sample(ts, len(es)) for n in c]

PLAIN_FACT = "the code for locker {n} is {c}."
FACTS = [PLAIN_FACT, "locker {n} opens with the code {c}.", "remember: locker {n} has code {c}."]
UPDATES = ["locker {n} has a new code now: {c}.", "the code for locker {n} was changed to {c}."]
QUESTIONS = ["what is the code for locker {n}? it is ", "which code opens locker {n}? ",
             "tell me the code of locker {n}: ", "locker {n} can be opened with "]


def _distractor(rng: random.Random, names: list[str]) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return (f"the {rng.choice(_THINGS)} to {rng.choice(_CITIES)} left late "
                f"on day {rng.randint(1, 28)}.")
    if kind == 1:
        return f"the weather in {rng.choice(_CITIES)} was {rng.choice(_WEATHER)} today."
    return f"locker {rng.choice(names)} is painted {rng.choice(_COLOURS)}."


@dataclass(frozen=True)
class RecallTask:
    n_sessions: int = 2
    facts_per_session: int = 3
    updates_per_session: int = 0
    distractors_per_session: int = 7
    questions_per_session: int = 1
    paraphrase: bool = False
    train_pool: str = "all"  # or "eval_size" (see the module doc)

    name = "recall"
    score_context = False  # probes are what is measured; context is written, not scored

    def __post_init__(self) -> None:
        own = "RecallTask"
        if self.n_sessions < 2:
            raise ValueError(f"{own}.n_sessions: at least 2 (facts, then questions)")
        for f in ("facts_per_session", "questions_per_session"):
            if getattr(self, f) < 1:
                raise ValueError(f"{own}.{f}: must be >= 1")
        for f in ("updates_per_session", "distractors_per_session"):
            if getattr(self, f) < 0:
                raise ValueError(f"{own}.{f}: must be >= 0")
        if self.questions_per_session > self.facts_per_session:
            raise ValueError(f"{own}.questions_per_session: at most facts_per_session")
        if self.updates_per_session > self.facts_per_session:
            raise ValueError(f"{own}.updates_per_session: at most facts_per_session")
        if self.train_pool not in TRAIN_POOLS:
            raise ValueError(f"{own}.train_pool: {self.train_pool!r} not in {TRAIN_POOLS}")

    def episode(self, split: str, seed: int, index: int) -> Episode:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be train or eval, got {split!r}")
        rng = random.Random(f"recall:{split}:{seed}:{index}")
        pool = EVAL_NAMES if split == "eval" else \
            _eval_sized_pool(rng) if self.train_pool == "eval_size" else TRAIN_NAMES
        n_fact_sessions = self.n_sessions - 1
        names = rng.sample(pool, self.facts_per_session * n_fact_sessions)
        current: dict[str, tuple[str, int, bool]] = {}  # name -> (code, session, is update)
        first_session: dict[str, int] = {}
        where: dict[str, str] = {}  # name -> the segment stating its current value
        sessions = []
        for s in range(self.n_sessions):
            sid = f"s{s + 1}"
            probes = self._probes(rng, s, first_session, current, where)  # state before s
            statements: list[tuple[str, str | None]] = []  # (text, fact name or None)
            if s < n_fact_sessions:
                new = names[s * self.facts_per_session:(s + 1) * self.facts_per_session]
                for n in new:
                    code = f"{rng.randrange(10_000):04d}"
                    tpl = rng.choice(FACTS) if self.paraphrase else PLAIN_FACT
                    statements.append((tpl.format(n=n, c=code), n))
                    current[n], first_session[n] = (code, s, False), s
                earlier = sorted(n for n in first_session if first_session[n] < s)
                for n in rng.sample(earlier, min(self.updates_per_session, len(earlier))):
                    code = f"{rng.randrange(10_000):04d}"
                    while code == current[n][0]:
                        code = f"{rng.randrange(10_000):04d}"
                    statements.append((rng.choice(UPDATES).format(n=n, c=code), n))
                    current[n] = (code, s, True)
            statements += [(_distractor(rng, pool), None)
                           for _ in range(self.distractors_per_session)]
            rng.shuffle(statements)
            sessions.append(Session(sid, tuple(t for t, _ in statements), tuple(probes)))
            for j, (_, n) in enumerate(statements):
                if n is not None and current[n][1] == s:
                    where[n] = segment_id(sid, j)
        return Episode(f"{self.name}-{split}-{seed}-{index}", tuple(sessions))

    def _probes(self, rng, s, first_session, current, where) -> list[Probe]:
        probes = []
        for j in range(s):
            facts = sorted(n for n, fs in first_session.items() if fs == j)
            for n in rng.sample(facts, self.questions_per_session):
                code, stated_in, updated = current[n]
                prompt = (rng.choice(QUESTIONS) if self.paraphrase
                          else PLAIN_FACT.split("{c}")[0]).format(n=n)
                probes.append(Probe(prompt, code, (where[n],),
                                    {"distance": s - stated_in, "updated": updated,
                                     "fact_session": j + 1}))
        return probes
