"""``engram.write.write_distillation_loss``: the vectorised loss equals a per-session loop
(softmax of the gate's logits over a session's segments against the share of read mass),
ignores invalid slots and unread sessions, and its gradient ranks a read segment up within
its session."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.write import write_distillation_loss


def _loop(s, sess, valid, mass):
    total, groups = 0.0, 0
    for b in range(s.shape[0]):
        for j in sorted(set(sess[b].tolist())):
            idx = [m for m in range(s.shape[1]) if sess[b, m] == j and valid[b, m]]
            read = sum(float(mass[b, m]) for m in idx)
            if not idx or read <= 0:
                continue
            log_p = torch.log_softmax(s[b, idx].double(), 0)
            total -= sum(float(mass[b, m]) / read * float(log_p[i]) for i, m in enumerate(idx))
            groups += 1
    return total / groups if groups else 0.0


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), M=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_equals_a_per_session_loop(B, M, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, M, generator=g)
    sess = torch.randint(0, 3, (B, M), generator=g)
    valid = torch.rand(B, M, generator=g) > 0.2
    mass = torch.rand(B, M, generator=g) * (torch.rand(B, M, generator=g) > 0.4)
    got = float(write_distillation_loss(s, sess, valid, mass))
    assert abs(got - _loop(s, sess, valid, mass)) < 1e-5


def test_gradient_ranks_the_read_segment_up_and_is_finite():
    s = torch.zeros(1, 5, requires_grad=True)
    sess = torch.tensor([[0, 0, 0, 1, 1]])
    valid = torch.tensor([[True, True, True, True, False]])  # slot 4: not written
    mass = torch.tensor([[0.0, 2.0, 0.0, 0.0, 0.0]])  # session 1 was not read
    loss = write_distillation_loss(s, sess, valid, mass)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[0, 1] < 0 < s.grad[0, 0]  # descent raises the read segment, lowers its peers
    assert s.grad[0, 0] == s.grad[0, 2]
    assert s.grad[0, 3] == 0 and s.grad[0, 4] == 0  # unread session, unwritten slot
    assert loss.item() > 0


def test_the_episode_objective_trains_the_gate_with_it():
    """Through ``EpisodeObjective.loss`` on the smoke experiment: with the coefficient on, the
    step reports a finite ``write_loss`` and the write gate's gradient changes; off, neither."""
    from pathlib import Path

    from sessions.experiment import load_experiment
    from sessions.objectives import EpisodeObjective
    from sessions.pipeline import build_model

    smoke = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "smoke.yaml"
    grads = {}
    for coef in (0.0, 1.0):
        exp = load_experiment(smoke, [f"engram.write_distill_coef={coef}"])
        model = build_model(exp, "on")
        objective = EpisodeObjective(exp, exp.train.seed, exp.objective.probes_per_episode)
        out = objective.loss(model, objective.batch(0))
        out.loss.backward()
        grads[coef] = model.writer.salience.weight.grad.clone()
        assert ("write_loss" in out.extras) == (coef > 0)
        if coef:
            assert torch.isfinite(out.extras["write_loss"]) and out.extras["write_loss"] > 0
    assert not torch.allclose(grads[0.0], grads[1.0])
