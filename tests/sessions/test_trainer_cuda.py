"""The trainer's optimizer on CUDA, one process (GPU, marked ``gpu``).

* Gradient clipping folded into the fused AdamW step (the optimizer divides every gradient by
  ``grad_scale`` as it reads it) equals ``clip_grad_norm_`` followed by the same step, with
  clipping active on every step.
* The experts' compute copies owned by the optimizer (``train.expert_copies``, the default:
  bf16 gradients on the copies, our Triton AdamW kernel writing master and copy) train like
  torch's fused AdamW on fp32 gradients of per-forward casts; the path taken is asserted
  (no expert master gets a gradient, the Triton kernel ran once per expert weight and step);
  an objective of several forwards a step (episodes) keeps them off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernels import optim
from mhc import compute_copies, presets
from mhc.model import MHCModel
from sessions.experiment import load_experiment
from sessions.objectives import EpisodeObjective, LMObjective, move
from sessions.optimizer import _expert_weights
from sessions.pipeline import build_model
from sessions.trainer import Trainer, autocast


def _trainer(tmp_path, name, fold: bool, copies: bool = False):
    run = presets.load("debug", [
        "train.steps=6", f"train.out_dir={tmp_path / name}", "train.log_every=1",
        "train.eval_every=1000", "train.checkpoint_every=1000", "train.warmup_steps=2",
        "train.batch_size=4", "train.grad_clip=0.05", "model.seq_len=64",
        f"train.expert_copies={str(copies).lower()}"])
    torch.manual_seed(0)
    trainer = Trainer(MHCModel(run.model), LMObjective(run, tmp_path, quiet=True), run.train,
                      run.train.out_dir, presets.to_plain(run), progress=False)
    assert trainer.clip_in_optimizer  # CUDA, fused AdamW, one process
    if not fold:  # the reference: clip_grad_norm_ rescales the gradients in place
        trainer.clip_in_optimizer = False
        del trainer.optimizer.grad_scale
    return trainer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_clipping_in_the_fused_step_equals_clip_grad_norm(tmp_path):
    folded, reference = _trainer(tmp_path, "fold", True), _trainer(tmp_path, "ref", False)
    norms = []
    for step in range(6):
        _, n_fold, _ = folded._step(step)
        _, n_ref, _ = reference._step(step)
        norms.append((float(n_fold), float(n_ref)))
        assert float(folded.optimizer.grad_scale) > 1.0, step  # clipping was active
    for a, b in norms:
        assert a == pytest.approx(b, rel=1e-4)
    for (name, p), q in zip(folded.model.named_parameters(), reference.model.parameters(),
                            strict=True):
        rel = float((p - q).detach().norm() / q.detach().norm().clamp_min(1e-12))
        assert rel < 1e-4, (name, rel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_expert_copies_train_like_torch_adamw(tmp_path):
    ours, plain = _trainer(tmp_path, "copies", True, True), _trainer(tmp_path, "plain", True)
    assert ours.expert_copies and not plain.expert_copies
    experts = _expert_weights(ours.model)
    assert experts
    # two steps: the paths differ by fp32 rounding only; later bf16 roundings flip and the
    # runs drift apart (tests/sessions/test_optimizer.py measures that on CPU)
    for step in range(2):
        before = optim.CALLS["triton"]
        out_a, n_a, _ = ours._step(step)
        out_b, n_b, _ = plain._step(step)
        assert optim.CALLS["triton"] - before == len(experts)  # our kernel, each expert weight
        assert float(out_a.lm_loss) == pytest.approx(float(out_b.lm_loss), rel=1e-5)
        assert float(n_a) == pytest.approx(float(n_b), rel=1e-4)
    for (name, p), q in zip(ours.model.named_parameters(), plain.model.parameters(),
                            strict=True):
        rel = float((p - q).detach().norm() / q.detach().norm().clamp_min(1e-12))
        assert rel < 1e-5, (name, rel)
    for p in experts:
        assert torch.equal(compute_copies.attached(p), p.detach().bfloat16())
    # the gradients of one more backward: on the copies, in bf16; none on the masters
    batch = ours.objective.batch(2)

    with autocast(ours.device):
        ours.objective.loss(ours.model, move(batch, ours.device)).loss.backward()
    assert all(p.grad is None for p in experts)
    assert all(compute_copies.attached(p).grad.dtype == torch.bfloat16 for p in experts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_episodes_keep_fp32_expert_gradients(tmp_path):
    """Episodes run the backbone several times a step: the copies' gradients would be summed
    in bf16, so the trainer leaves the copies off there."""
    smoke = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "smoke.yaml"
    exp = load_experiment(str(smoke), ["train.device=cuda"])
    trainer = Trainer(build_model(exp, "on"), EpisodeObjective(exp, exp.train.seed), exp.train,
                      tmp_path / "ep", {}, progress=False)
    assert exp.train.expert_copies and not trainer.expert_copies
    assert all(compute_copies.attached(p) is None for p in trainer.model.parameters())
