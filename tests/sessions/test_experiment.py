"""Experiment configs: every field resolved, overrides typed against the field they set
(YAML's on/off stay strings where the field is a string), unknown keys rejected by name,
the memory flag resolved in one place."""

from pathlib import Path

import pytest
import yaml

from engram.config import resolve
from sessions.experiment import apply_overrides, from_plain, load_experiment, to_plain

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "configs" / "experiments" / "smoke.yaml")


def test_resolved_config_round_trips_through_yaml():
    exp = load_experiment(SMOKE)
    plain = to_plain(exp)
    assert set(plain) == {"name", "model", "train", "engram", "task", "eval_task", "eval",
                          "ablate", "objective"}
    assert "data" not in plain["train"] and "out_dir" not in plain["train"]
    assert from_plain(yaml.safe_load(yaml.safe_dump(plain))) == exp
    assert plain["task"]["questions_per_session"] == 1  # task defaults written out


def test_overrides_are_typed_by_their_field():
    exp = load_experiment(SMOKE, ["engram.recency=off", "engram.write_policy=all",
                                  "train.lr=1", "ablate.arms=[off,on,on:random]",
                                  "task.paraphrase=false", "eval_task.distractors_per_session=5",
                                  "engram.read_layers=[0]"])
    assert exp.engram.recency == "off" and exp.engram.write_policy == "all"
    assert exp.train.lr == 1.0 and isinstance(exp.train.lr, float)
    assert exp.ablate.arms == ["off", "on", "on:random"]
    assert exp.task["paraphrase"] is False
    assert exp.make_task("eval").distractors_per_session == 5
    assert exp.make_task("train").distractors_per_session == 2
    assert exp.engram.read_layers == [0]


@pytest.mark.parametrize("override,message", [
    ("train.steps=2.5", "TrainConfig.steps"), ("engram.top_k=many", "engram.top_k: expected int"),
    ("eval_task.colour=red", "eval_task.colour"), ("model.ffn.kind=nope", "FFNConfig.kind"),
    ("train.out_dir=x", "use --out"), ("seed=3", "no such key"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_experiment(SMOKE, [override])


def test_yaml_off_on_a_string_field_and_unknown_sections(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("preset: tiny\ntask: {name: recall}\nengram: {recency: off}\n")
    assert load_experiment(path).engram.recency == "off"
    path.write_text("task: {name: recall}\ntrainer: {steps: 1}\n")
    with pytest.raises(ValueError, match="unknown section 'trainer'"):
        load_experiment(path)
    with pytest.raises(ValueError, match="no such key"):
        apply_overrides(to_plain(load_experiment(SMOKE)), ["train.nope=1"])


def test_memory_flag_precedence(monkeypatch):
    exp = load_experiment(SMOKE)
    assert exp.memory == "on"
    monkeypatch.setenv("ENGRAM_ENABLED", "0")
    assert resolve(exp.engram).enabled is False
    assert resolve(exp.engram, "trained-off").enabled and not resolve(exp.engram,
                                                                      "trained-off").read


def test_probe_sampling_balanced_by_a_tag():
    """``objective.balance_probes_by``: rare tag values are sampled about as often as common
    ones (an independent count against the plain sampler); without it, the plain sampler."""
    import random
    from collections import Counter

    from sessions.objectives import sample_probes

    exp = load_experiment(ROOT / "configs/experiments/recall5.yaml", [])
    task = exp.make_task("train")
    eps = [task.episode("train", 0, i) for i in range(64)]
    everything = Counter(p.tags["distance"] for e in eps for s in e.sessions for p in s.probes)

    def share(balance_by: str) -> dict:
        got = Counter()
        for seed in range(20):
            chosen = sample_probes(eps, 4, random.Random(seed), balance_by)
            assert len(chosen) == 4 * len(eps)  # k distinct probes of every episode
            got.update(eps[b].sessions[s].probes[i].tags["distance"] for b, s, i in chosen)
        return {d: got[d] / everything[d] for d in everything}  # fraction of each value taken

    plain, balanced = share(""), share("distance")
    assert everything[4] < everything[1] / 10  # the rare value the option is for
    assert balanced[4] > 2 * plain[4]
    assert balanced[4] > balanced[1]  # rare values taken at a higher rate than common ones
    rng_a, rng_b = random.Random(3), random.Random(3)
    refs = [[(b, s, i) for s, sess in enumerate(e.sessions) for i in range(len(sess.probes))]
            for b, e in enumerate(eps)]
    assert sample_probes(eps, 4, rng_a) == {r for row in refs for r in rng_b.sample(row, 4)}
    with pytest.raises(ValueError, match="balance_probes_by: needs probes_per_episode"):
        load_experiment(ROOT / "configs/experiments/recall5.yaml",
                        ["objective.probes_per_episode=0",
                         "objective.balance_probes_by=distance"])
