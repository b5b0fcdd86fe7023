"""The recall task: seeded episodes, answer positions point at the code's digits, evaluation
facts never appear in training, and the write policies pick what they say."""

import torch

from engram.config import EngramConfig
from engram.write import select
from sessions.tasks.recall import EVAL_NAMES, TRAIN_NAMES, RecallTask


def test_episodes_are_seeded_and_answers_located():
    task = RecallTask(split="train", seed=4)
    assert task.episode(3) == task.episode(3)
    assert task.episode(3) != task.episode(4)
    batch = task.batch(0, 6)
    assert batch.write_BNS.shape == (6, task.n_segments, 40)
    for b in range(6):
        ep = task.episode(b)
        digits = bytes(batch.targets_BS[b, batch.answer_pos_B4[b]].tolist()).decode()
        assert digits == ep["code"]
        assert int(batch.is_fact_BN[b].sum()) == task.n_facts
        asked = int(batch.asked_BN[b].float().argmax())
        assert bytes(batch.write_BNS[b, asked].tolist()).decode().strip() == ep["question"]
        # the question is the asked fact's text: its inputs hold the code only as targets
        assert torch.equal(batch.question_BS[b, 1:], batch.targets_BS[b, :-1])


def test_evaluation_facts_never_seen_in_training():
    assert not set(TRAIN_NAMES) & set(EVAL_NAMES)
    train_names = {n for i in range(500) for n, _ in RecallTask(split="train").episode(i)["facts"]}
    eval_names = {n for i in range(500) for n, _ in RecallTask(split="eval").episode(i)["facts"]}
    assert train_names and eval_names and not train_names & eval_names


def test_write_policies():
    cfg = EngramConfig(write_budget=0.3, write_threshold=0.5)
    sal = torch.tensor([0.1, 3.0, -2.0, 2.0, 0.0, -1.0, 1.0, -3.0, 0.5, -0.5])
    assert select(sal, cfg, "budget").nonzero().flatten().tolist() == [1, 3, 6]
    assert select(sal, cfg, "threshold").tolist() == (torch.sigmoid(sal) > 0.5).tolist()
    g = torch.Generator().manual_seed(0)
    rand = select(sal, cfg, "random", g)
    assert int(rand.sum()) == 3
    assert bool(select(sal, cfg, "all").all())
