"""The recall task: episodes are a pure function of (config, split, seed, index); evaluation
facts never appear in training; every probe's answer is, by an independent reading of the
episode's text, the newest code stated for its locker in an earlier session; paraphrased
questions are never the fact's own sentence."""

import re

import pytest

from sessions.tasks import build_task, task_spec
from sessions.tasks.recall import EVAL_NAMES, TRAIN_NAMES, RecallTask

FIVE = RecallTask(n_sessions=5, facts_per_session=2, updates_per_session=1,
                  distractors_per_session=4, paraphrase=True)
CODE = re.compile(r"locker ([A-Z]{2})\D*?(\d{4})\.$")


def test_episodes_are_pure_functions_of_their_arguments():
    assert FIVE.episode("train", 3, 7) == FIVE.episode("train", 3, 7)
    assert FIVE.episode("train", 3, 7) != FIVE.episode("train", 3, 8)
    assert FIVE.episode("train", 3, 7) != FIVE.episode("train", 4, 7)
    assert FIVE.episode("train", 3, 7) != FIVE.episode("eval", 3, 7)
    assert RecallTask(n_sessions=5, paraphrase=True).episode("eval", 0, 1) != \
        FIVE.episode("eval", 0, 1)


def test_evaluation_facts_never_seen_in_training():
    assert not set(TRAIN_NAMES) & set(EVAL_NAMES)

    def names(split):
        return {m.group(1) for i in range(300) for s in FIVE.episode(split, 0, i).sessions
                for c in s.context if (m := CODE.search(c))}

    train, evaluation = names("train"), names("eval")
    assert train and evaluation and not train & evaluation


@pytest.mark.parametrize("task", [FIVE, RecallTask(), RecallTask(n_sessions=3,
                                                                  updates_per_session=2)])
def test_answers_are_the_newest_earlier_statement(task):
    updated = distances = 0
    for i in range(100):
        ep = task.episode("eval", 1, i)
        assert [s.id for s in ep.sessions] == [f"s{k + 1}" for k in range(task.n_sessions)]
        latest: dict[str, tuple[str, int, str]] = {}  # name -> (code, session, segment id)
        for s_idx, sess in enumerate(ep.sessions):
            for p in sess.probes:  # read before this session's own statements
                name = re.search(r"locker ([A-Z]{2})", p.prompt).group(1)
                code, where, seg = latest[name]
                assert p.answer == code and p.evidence == (seg,)
                assert p.tags["distance"] == s_idx - where
                assert p.prompt.strip() not in {c.split(code)[0].strip() for c in sess.context}
                updated += p.tags["updated"]
                distances += 1
            for j, c in enumerate(sess.context):
                if m := CODE.search(c):
                    latest[m.group(1)] = (m.group(2), s_idx, f"{sess.id}/{j}")
        assert len(ep.sessions[-1].probes) == (task.n_sessions - 1) * task.questions_per_session
    assert distances and (updated or not task.updates_per_session)


def test_paraphrase_questions_differ_from_the_fact_sentence():
    for i in range(50):
        ep = FIVE.episode("eval", 0, i)
        facts = [c for s in ep.sessions for c in s.context]
        for s in ep.sessions:
            for p in s.probes:
                assert not any(f.startswith(p.prompt) for f in facts)
    plain = RecallTask().episode("eval", 0, 0)
    p = plain.sessions[1].probes[0]
    assert any(c == p.prompt + p.answer + "." for c in plain.sessions[0].context)


def test_task_sections_are_checked():
    assert task_spec(build_task({"name": "recall", "n_sessions": 5}))["n_sessions"] == 5
    with pytest.raises(ValueError, match="task.name"):
        build_task({"name": "nope"})
    with pytest.raises(ValueError, match="task.sessions"):
        build_task({"name": "recall", "sessions": 5})
    with pytest.raises(ValueError, match="n_sessions"):
        build_task({"name": "recall", "n_sessions": 1})


def _anagram_rate(task, split, n=400):
    """Share of episodes whose facts name two lockers that are each other's reversal."""
    hit = 0
    for i in range(n):
        names = {m.group(1) for s in task.episode(split, 0, i).sessions for c in s.context
                 if (m := CODE.search(c))}
        hit += any(a[::-1] in names and a != a[::-1] for a in names)
    return hit / n


def test_eval_sized_training_pool_meets_anagrams_as_often_as_evaluation():
    """``train_pool="eval_size"``: evaluation episodes unchanged, training names still never
    evaluation names, and reversal pairs (LJ / JL) as frequent in training as in evaluation
    (the plain training pool, 4× larger, has them about 4× less often)."""
    sized = RecallTask(**{**FIVE.__dict__, "train_pool": "eval_size"})
    assert sized.episode("eval", 0, 5) == FIVE.episode("eval", 0, 5)
    assert sized.episode("train", 0, 5) != FIVE.episode("train", 0, 5)
    train_names = {m.group(1) for i in range(200) for s in sized.episode("train", 0, i).sessions
                   for c in s.context if (m := CODE.search(c))}
    assert train_names and train_names <= set(TRAIN_NAMES)
    evaluation, plain, eval_sized = (_anagram_rate(FIVE, "eval"), _anagram_rate(FIVE, "train"),
                                     _anagram_rate(sized, "train"))
    assert evaluation > 0.1  # 8 fact names of 136: about 1 episode in 5
    assert abs(eval_sized - evaluation) < 0.06 and plain < evaluation / 2


def test_unknown_train_pool_is_a_typed_error():
    with pytest.raises(ValueError, match="RecallTask.train_pool"):
        RecallTask(train_pool="big")
