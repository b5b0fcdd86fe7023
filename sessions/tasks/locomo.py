"""LoCoMo conversations replayed as sessions: the bridge between the model's latent retrieval
and the store's text retrieval.

One conversation is a namespace; each LoCoMo session a session (``s1``, ``s2``, ... in
order, dated with the session's date and time, which the store keeps as the traces'
``happened_at``); each turn a context segment ``"<speaker>: <text>"`` (plus ``[shares
<caption>]`` for a shared image), so dialogue turn ``D3:5`` is segment ``s3/4``. The
questions are probes of one more session, ``questions``, after the last one (prompt: the
question and a newline; answer: LoCoMo's answer, ``not mentioned`` for the adversarial
category 5), with their evidence turns as evidence (malformed evidence strings such as
``"D8:6; D9:17"`` or ``"D:11:26"`` are normalised; ones naming no turn are dropped) and tags
``category`` (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial).

``text_retrieval = True``: the runner also logs what the store's own text search returns for
each question, so the report puts evidence recall@1/5/10 of the model's read layers beside it.

Data: ``../shared/data/locomo_dev/locomo_dev5.json`` (five conversations; see its README).
Split by conversation (``train`` / ``eval`` sample ids). Training episodes are subsampled, a
pure function of (seed, index): ``train_questions`` questions of one training conversation,
the sessions holding their evidence plus ``distractor_sessions`` others, in order;
evaluation episodes are whole conversations.
"""

from __future__ import annotations

import datetime
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from sessions.episodes import Episode, Probe, Session, segment_id

DEFAULT_DATA = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "locomo_dev" /
                   "locomo_dev5.json")
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop",
              5: "adversarial"}
_DIA = re.compile(r"D:?(\d+):(\d+)")
_DATE = re.compile(r"(\d{1,2}):(\d{2})\s*(am|pm)\s+on\s+(\d{1,2})\s+(\w+),?\s+(\d{4})", re.I)


def parse_date(text: str) -> str:
    """``"1:56 pm on 8 May, 2023"`` -> ``"2023-05-08T13:56:00"``."""
    m = _DATE.search(text)
    if not m:
        raise ValueError(f"LoCoMo date {text!r}: expected '<h>:<mm> am|pm on <d> <Month>, <y>'")
    hour, minute, half, day, month, year = m.groups()
    month_no = datetime.datetime.strptime(month[:3], "%b").month
    hour = int(hour) % 12 + (12 if half.lower() == "pm" else 0)
    return datetime.datetime(int(year), month_no, int(day), hour, int(minute)).isoformat()


def normalise_evidence(raw: list[str]) -> list[str]:
    """Dialogue ids ``D<session>:<turn>`` out of LoCoMo's evidence strings."""
    out = []
    for item in raw:
        for m in _DIA.finditer(str(item)):
            dia = f"D{int(m.group(1))}:{int(m.group(2))}"
            if dia not in out:
                out.append(dia)
    return out


def conversation_episode(sample: dict) -> tuple[Episode, list[Probe]]:
    """The sessions of one conversation (no probes) and its questions as probes."""
    conv = sample["conversation"]
    numbers = sorted(int(k.split("_")[1]) for k in conv
                     if re.fullmatch(r"session_\d+", k) and conv[k])
    sessions, where = [], {}
    for n in numbers:
        turns = []
        for j, t in enumerate(conv[f"session_{n}"]):
            text = f"{t['speaker']}: {t['text']}"
            if t.get("blip_caption"):
                text += f" [shares {t['blip_caption']}]"
            turns.append(text)
            where[t["dia_id"]] = segment_id(f"s{n}", j)
        sessions.append(Session(f"s{n}", tuple(turns),
                                date=parse_date(conv[f"session_{n}_date_time"])))
    probes = []
    for i, q in enumerate(sample["qa"]):
        evidence = tuple(where[d] for d in normalise_evidence(q.get("evidence", []))
                         if d in where)
        answer = "not mentioned" if q["category"] == 5 else str(q.get("answer", "")).strip()
        probes.append(Probe(q["question"].strip() + "\n", answer or "not mentioned", evidence,
                            {"category": q["category"],
                             "category_name": CATEGORIES.get(q["category"], "?"),
                             "question": i}))
    return Episode(f"locomo-{sample['sample_id']}", tuple(sessions)), probes


@dataclass(frozen=True)
class LocomoTask:
    data: str = DEFAULT_DATA
    train: list = field(default_factory=lambda: ["conv-26", "conv-30", "conv-41"])
    eval: list = field(default_factory=lambda: ["conv-42", "conv-43"])
    train_questions: int = 6  # questions per training episode
    distractor_sessions: int = 2  # sessions without their evidence in a training episode
    max_answer_bytes: int = 48  # longer answers are cut (they are scored, not retrieved)

    name = "locomo"
    score_context = False
    text_retrieval = True  # log the store's text search beside the model's retrieval
    _loaded: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        both = set(self.train) & set(self.eval)
        if both:
            raise ValueError(f"LocomoTask: conversation {sorted(both)[0]!r} is in both "
                             "train and eval")
        if self.train_questions < 1 or self.distractor_sessions < 0:
            raise ValueError("LocomoTask.train_questions >= 1, distractor_sessions >= 0")

    def _conversations(self) -> dict[str, tuple[Episode, list[Probe]]]:
        if "all" not in self._loaded:
            path = Path(self.data)
            if not path.is_file():
                raise FileNotFoundError(f"task.data: {path} does not exist (LoCoMo dev "
                                        "conversations: ../shared/data/locomo_dev/)")
            samples = json.loads(path.read_text())
            self._loaded["all"] = {s["sample_id"]: conversation_episode(s) for s in samples}
            missing = sorted((set(self.train) | set(self.eval)) - set(self._loaded["all"]))
            if missing:
                raise ValueError(f"task: conversation {missing[0]!r} is not in {path}")
        return self._loaded["all"]

    def _fit(self, probe: Probe) -> Probe:
        answer = probe.answer.encode("utf-8")[:self.max_answer_bytes].decode("utf-8", "ignore")
        return Probe(probe.prompt, answer.strip() or probe.answer[:1], probe.evidence,
                     probe.tags)

    def count(self, split: str) -> int:
        return len(self.eval if split == "eval" else self.train)

    def episode(self, split: str, seed: int, index: int) -> Episode:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be train or eval, got {split!r}")
        convs = self._conversations()
        if split == "eval":
            ep, probes = convs[self.eval[index % len(self.eval)]]
            return Episode(ep.namespace, ep.sessions + (
                Session("questions", probes=tuple(self._fit(p) for p in probes)),))
        return self._subsample(self.train, f"locomo:{seed}:{index}", f"-{seed}-{index}")

    validation_episodes = 4  # the training curve: subsampled episodes of eval conversations

    def validation_episode(self, seed: int, index: int) -> Episode:
        return self._subsample(self.eval, f"locomo-val:{seed}:{index}", f"-val-{index}")

    def _subsample(self, names: list[str], key: str, suffix: str) -> Episode:
        convs = self._conversations()
        rng = random.Random(key)
        ep, probes = convs[names[rng.randrange(len(names))]]
        asked = rng.sample([p for p in probes if p.evidence],
                           min(self.train_questions, sum(bool(p.evidence) for p in probes)))
        needed = {e.split("/")[0] for p in asked for e in p.evidence}
        others = [s.id for s in ep.sessions if s.id not in needed]
        keep = needed | set(rng.sample(others, min(self.distractor_sessions, len(others))))
        sessions = tuple(s for s in ep.sessions if s.id in keep)
        return Episode(f"{ep.namespace}{suffix}", sessions + (
            Session("questions", probes=tuple(self._fit(p) for p in asked)),))
