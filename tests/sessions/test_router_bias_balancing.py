"""Router-bias (aux-loss-free) balancing is applied by every training loop, the memory
(episode) objective included: all loops go through ``Trainer._step``, which steps the biases
after every optimizer step. Checked here on the Engram episode objective with
``model.ffn.bias_balancing=true``: one bias update per layer and step, and the buffers end
where the update rule applied to the counts of those steps puts them (recomputed here)."""

from __future__ import annotations

from pathlib import Path

import torch

from mhc.router import Router
from sessions.experiment import load_experiment
from sessions.pipeline import train_model

SMOKE = str(Path(__file__).resolve().parents[2] / "configs" / "experiments" / "smoke.yaml")
STEPS, RATE = 5, 0.01


def _train(tmp_path, monkeypatch, balancing: bool):
    counts = []
    update = Router.update_bias

    def spy(self, counts_E):
        counts.append(counts_E.detach().clone())
        return update(self, counts_E)

    monkeypatch.setattr(Router, "update_bias", spy)
    exp = load_experiment(SMOKE, [f"train.steps={STEPS}", "train.log_every=5",
                                  "train.eval_every=1000", f"model.ffn.bias_balancing={balancing}",
                                  f"model.ffn.bias_update_rate={RATE}"])
    model, info = train_model(exp, "on", tmp_path / str(balancing), progress=False)
    assert info["steps"] == STEPS and model.memory_enabled
    return exp, model.backbone, counts


def test_episode_objective_steps_router_biases_after_every_step(tmp_path, monkeypatch):
    exp, backbone, counts = _train(tmp_path, monkeypatch, True)
    L, G = exp.model.n_layers, exp.model.ffn.n_domains
    assert len(counts) == STEPS * L  # every step, every layer
    moved = 0
    for i, block in enumerate(backbone.blocks):
        want = torch.zeros_like(block.ffn.router.bias_R)
        for c in counts[i::L]:
            c = c.double()
            dom = c.view(G, -1).sum(1)
            want[:G] += RATE * torch.sign(dom.mean() - dom).to(want.dtype)
            want[G:] += RATE * torch.sign(c.mean() - c).to(want.dtype)
        torch.testing.assert_close(block.ffn.router.bias_R, want)
        moved += int(want.abs().sum() > 0)
    assert moved == L


def test_without_balancing_the_biases_stay_zero(tmp_path, monkeypatch):
    _, backbone, counts = _train(tmp_path, monkeypatch, False)
    assert not counts  # the model skips the update when balancing is off
    assert all(float(b.ffn.router.bias_R.abs().sum()) == 0 for b in backbone.blocks)
