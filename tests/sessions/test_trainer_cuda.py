"""The trainer's gradient clipping on CUDA, folded into the fused AdamW step (the optimizer
divides every gradient by ``grad_scale`` as it reads it) equals ``clip_grad_norm_`` followed
by the same step, with clipping active on every step; one process only (GPU, marked ``gpu``)."""

from __future__ import annotations

import pytest
import torch

from mhc import presets
from mhc.model import MHCModel
from sessions.objectives import LMObjective
from sessions.trainer import Trainer


def _trainer(tmp_path, name, fold: bool):
    run = presets.load("debug", [
        "train.steps=6", f"train.out_dir={tmp_path / name}", "train.log_every=1",
        "train.eval_every=1000", "train.checkpoint_every=1000", "train.warmup_steps=2",
        "train.batch_size=4", "train.grad_clip=0.05", "model.seq_len=64"])
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
