"""The guard against a memory model that stops learning: a short CPU training of the smoke
model on two-session recall (about 20 s on 2 cores) must answer with memory and fail
without it, by a stated margin. Evaluation runs through the real store."""

from pathlib import Path

from sessions.experiment import load_experiment
from sessions.pipeline import evaluate_arm, evaluation_episodes, train_model
from sessions.runner import Arm

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "experiments" / "smoke.yaml")
# Measured on the 2-core dev CPU at 300 steps: on 1.000, trained-off 0.000 (32 episodes).
MIN_ON, MAX_OFF = 0.8, 0.1


def test_memory_on_beats_memory_off_after_a_short_training(tmp_path):
    exp = load_experiment(SMOKE, [
        "train.steps=300", "train.batch_size=8", "train.warmup_steps=30", "train.log_every=50",
        "train.eval_every=1000", "task.n_sessions=2", "task.facts_per_session=3",
        "task.distractors_per_session=4", "task.updates_per_session=0",
        "task.paraphrase=false", "eval.episodes=32", "eval.batch_size=16"])
    model, info = train_model(exp, "on", tmp_path / "train", progress=False)
    assert info["steps"] == 300
    episodes = evaluation_episodes(exp)
    on = evaluate_arm(model, Arm.parse("on"), exp, episodes, tmp_path / "on", progress=False)
    off = evaluate_arm(model, Arm.parse("trained-off"), exp, episodes, tmp_path / "off",
                       progress=False)
    assert on["probes"] == off["probes"] == 32
    assert on["exact_match"] >= MIN_ON, on
    assert off["exact_match"] <= MAX_OFF, off
    assert on["exact_match"] - off["exact_match"] >= MIN_ON - MAX_OFF
