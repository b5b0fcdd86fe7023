"""``sessions.optimizer.AdamW`` with the experts' compute copies against torch's AdamW on
the same model without them (two paths: bf16 copies written by our step and bf16 gradients
read from the copies, vs a cast of each master per forward and fp32 gradients).

On CPU under bf16 autocast (the FFN computes in bf16 there too) with torch's fused CPU AdamW
for everything else and clipping folded into ``grad_scale`` as the trainer does on CUDA:
losses, gradient norms and every parameter agree; the gradients live on the copies, the
masters get none; each copy equals its master rounded after every step; the state dict is
torch AdamW's (it loads into one and training continues the same); loading weights into the
model refreshes the copies; ``zero_grad`` (the optimizer's and the model's) clears them; a
closure runs before the step; frozen experts stay frozen; a later optimizer without copies
detaches them. The Triton kernel itself is tested in
``tests/kernels/test_adamw.py``; the trainer on a GPU in ``test_trainer_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mhc import compute_copies
from mhc.config import FFNConfig, ModelConfig, TrainConfig
from mhc.model import MHCModel
from sessions.optimizer import AdamW, _expert_weights, _one_minus_powers

CLIP = 0.05  # small enough that clipping acts on every step


def _model(seed=0):
    ffn = FFNConfig(kind="hierarchical", hidden=16, n_domains=2, n_components=4, k1=2, k2=2)
    torch.manual_seed(seed)
    return MHCModel(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, ffn=ffn))


def _optimizer(model, copies: bool):
    t = TrainConfig()
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = AdamW(groups, lr=1e-2, betas=(t.beta1, t.beta2), fused=True,
                copy_masters=_expert_weights(model) if copies else ())
    opt.grad_scale = torch.ones(())
    return opt


def _rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


def _batch(step):
    return torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(step))


def _step(model, opt, step, forward=None):
    """One trainer-like step; ``forward``: the model to run (default ``model``)."""
    idx = _batch(step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (model if forward is None else forward)(idx[:, :-1], idx[:, 1:]).loss
    loss.backward()
    norm = opt.grad_norm()
    opt.grad_scale.copy_(((norm + 1e-6) / CLIP).clamp_min(1.0))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), float(norm)


def _train(copies: bool, steps=5):
    model = _model()
    opt = _optimizer(model, copies)
    return model, opt, [_step(model, opt, s) for s in range(steps)]


@pytest.mark.parametrize("steps,bound", [(1, 1e-6), (2, 2e-5)])
def test_copies_train_like_torch_adamw(steps, bound):
    # After one step the paths differ by fp32 rounding in AdamW (~1e-7). From the second on,
    # a copy whose bf16 rounding flipped (masters ~1e-7 apart straddle a bf16 boundary) gives
    # that expert another gradient: ~5e-6 after two steps here, and bf16 training is chaotic
    # after that (1e-4 after 3 steps, 1e-2 after 5, both paths alike).
    ours, opt, ours_log = _train(True, steps=steps)
    plain, plain_opt, plain_log = _train(False, steps=steps)
    assert ours_log[0][0] == plain_log[0][0]  # the first forward is the same numbers
    for (la, na), (lb, nb) in zip(ours_log, plain_log, strict=True):
        assert la == pytest.approx(lb, rel=1e-6)
        assert na == pytest.approx(nb, rel=1e-6)
        assert nb > CLIP  # clipping acted
    moved = 0.0
    for (name, p), q, p0 in zip(ours.named_parameters(), plain.parameters(),
                                _model().parameters(), strict=True):
        rel = _rel(p, q)
        assert rel < bound, (name, rel)
        moved = max(moved, _rel(q, p0))
    assert moved > 1e-2  # training changed the weights: the comparison is not of two inits
    for p in _expert_weights(ours):  # the copies are the masters, rounded
        assert torch.equal(compute_copies.attached(p), p.detach().bfloat16())
    assert set(opt.state_dict()["state"]) == set(plain_opt.state_dict()["state"])


def test_gradients_live_on_the_copies():
    model = _model()
    opt = _optimizer(model, True)
    idx = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :-1], idx[:, 1:]).loss.backward()
    experts = _expert_weights(model)
    assert experts and all(p.grad is None for p in experts)
    grads = [compute_copies.attached(p).grad for p in experts]
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads)
    others = [p for p in model.parameters() if all(p is not e for e in experts)]
    assert len(opt.gradients()) == len(experts) + sum(p.grad is not None for p in others)
    expected = torch.nn.utils.get_total_norm([g.float() for g in opt.gradients()])
    assert float(opt.grad_norm()) == pytest.approx(float(expected), rel=1e-6)
    opt.zero_grad(set_to_none=True)
    assert all(compute_copies.attached(p).grad is None for p in experts)
    assert opt.gradients() == []


def test_state_dict_continues_in_torch_adamw():
    model, opt, _ = _train(True, steps=3)
    twin = copy.deepcopy(model)  # parameters only: no attached copies
    assert all(compute_copies.attached(p) is None for p in twin.parameters())
    plain = _optimizer(twin, False)
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))  # else both share the moments
    a, b = _step(model, opt, 3), _step(twin, plain, 3)
    assert a[0] == pytest.approx(b[0], abs=1e-5)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert _rel(p, q) < 1e-3


def test_loading_weights_refreshes_the_copies():
    model, _, _ = _train(True, steps=2)
    fresh = _model(seed=1)
    model.load_state_dict(fresh.state_dict())  # in place: version counters move
    idx = _batch(9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(idx[:, :-1], idx[:, 1:]).loss
        want = fresh(idx[:, :-1], idx[:, 1:]).loss
    assert float(got) == float(want)
    for p in _expert_weights(model):
        assert torch.equal(compute_copies.attached(p), p.detach().bfloat16())


def test_bad_masters_are_refused():
    model = _model()
    experts = _expert_weights(model)
    with pytest.raises(ValueError, match="amsgrad nor maximize"):
        AdamW(model.parameters(), amsgrad=True, copy_masters=experts)
    stranger = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="one of the parameters"):
        AdamW(model.parameters(), copy_masters=[stranger])
    with pytest.raises(ValueError, match="contiguous fp32"):
        AdamW([stranger], copy_masters=[torch.nn.Parameter(torch.zeros(4, 4).t())])


def test_a_closure_runs_before_the_step():
    model, ref = _model(), _model()
    opt, plain = _optimizer(model, True), _optimizer(ref, False)

    def closure_of(m, o):
        def closure():
            o.zero_grad()
            idx = _batch(0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = m(idx[:, :-1], idx[:, 1:]).loss
            loss.backward()
            return loss
        return closure

    la, lb = opt.step(closure_of(model, opt)), plain.step(closure_of(ref, plain))
    assert float(la.detach()) == float(lb.detach())
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert _rel(p, q) < 1e-6
    assert _rel(_expert_weights(model)[0], _expert_weights(_model())[0]) > 1e-2  # moved


def test_frozen_experts_stay_frozen():
    model = _model()
    experts = _expert_weights(model)
    for p in experts:
        p.requires_grad_(False)
    before = [p.detach().clone() for p in experts]
    opt = _optimizer(model, True)
    _step(model, opt, 0)
    assert all(torch.equal(p, b) for p, b in zip(experts, before, strict=True))
    assert all(compute_copies.attached(p).grad is None for p in experts)


def test_a_later_optimizer_without_copies_detaches_them():
    model, _, _ = _train(True, steps=1)
    experts = _expert_weights(model)
    _optimizer(model, False)  # e.g. a CPU or distributed trainer on the same model
    assert all(compute_copies.attached(p) is None for p in experts)
    idx = _batch(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :-1], idx[:, 1:]).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in experts)


def test_model_zero_grad_clears_the_copies():
    model = _model()
    _optimizer(model, True)
    idx = _batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :-1], idx[:, 1:]).loss.backward()
    experts = _expert_weights(model)
    assert all(compute_copies.attached(p).grad is not None for p in experts)
    model.zero_grad(set_to_none=True)
    assert all(compute_copies.attached(p).grad is None for p in experts)
    assert all(p.grad is None for p in model.parameters())


def test_a_compiled_forward_reads_the_copies():
    """``torch.compile(fullgraph=True)``: the copies are graph inputs (bf16 gradients, none on
    the masters), the step's rewrite reaches the compiled forward, and a master loaded from
    elsewhere reaches it after ``refresh`` (the trainer's call before every step)."""
    model, eager = _model(), _model()
    opt, eager_opt = _optimizer(model, True), _optimizer(eager, True)
    compiled = torch.compile(model, fullgraph=True)
    for s in range(2):
        got, want = _step(model, opt, s, compiled), _step(eager, eager_opt, s)
        assert got[0] == pytest.approx(want[0], rel=1e-4)
        assert got[1] == pytest.approx(want[1], rel=1e-3)
    idx = _batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(idx[:, :-1], idx[:, 1:]).loss.backward()
    assert all(p.grad is None for p in _expert_weights(model))
    assert all(compute_copies.attached(p).grad.dtype == torch.bfloat16
               for p in _expert_weights(model))
    opt.zero_grad()
    fresh = _model(seed=1)
    model.load_state_dict(fresh.state_dict())
    compute_copies.refresh(_expert_weights(model))
    idx = _batch(9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(idx[:, :-1], idx[:, 1:]).loss, fresh(idx[:, :-1], idx[:, 1:]).loss
    assert float(got) == pytest.approx(float(want), rel=1e-4)


def test_the_step_leaves_no_stale_copy_behind():
    """The torch reference updates the master in place (its version counter moves); the
    optimizer marks the copy current, so the next forward does not cast it again."""
    model = _model()
    opt = _optimizer(model, True)
    _step(model, opt, 0)
    copies = [compute_copies.attached(p) for p in _expert_weights(model)]
    versions = [c._version for c in copies]
    idx = _batch(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :-1], idx[:, 1:])
    assert [c._version for c in copies] == versions


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.95, 0.999, 0.9999, 0.99999])
def test_bias_corrections_are_accurate_near_one(beta):
    """``1 - beta ** step`` from fp32 step tensors within 1e-6 of the double-precision value
    (the fp32 ``1 - pow`` form is 1.7e-4 off at beta 0.9999, step 1)."""
    steps = [torch.tensor(float(s)) for s in (1, 2, 7, 100, 10_000)]
    for got, s in zip(_one_minus_powers(beta, steps), (1, 2, 7, 100, 10_000), strict=True):
        want = 1 - beta ** s
        assert got.dtype == torch.float32
        assert abs(float(got) - want) <= 1e-6 * want, (beta, s, float(got), want)
