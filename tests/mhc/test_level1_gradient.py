"""The level-1 (domain) router learns from the language-model loss, for every k1.

With the two-level weights renormalized across both levels, p(domain) cancelled when k1 = 1
and only the auxiliary losses trained level 1. Here every auxiliary term is off (aux, z,
domain label and distillation coefficients 0) and only ``lm_loss`` is differentiated; the
gradient reaching the level-1 parameters — the first G columns of each hierarchical router's
``weight_DR``, or every parameter of the progressive ``DomainEncoder`` — must be non-zero,
must match a finite difference of the loss (float64, torch reference), and the Triton kernels
must produce the same gradient as the reference.

"Non-zero" is relative: a cancelled gradient is not exactly zero in floating point but
rounding noise, 1e-7 to 1e-10 of the level-2 routers' gradient norm (measured with the old
weights, ``test_threshold_rejects_cancelled_gradient``); a learning level 1 gets 2e-3 to 1 of
it, so the tests ask for at least 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from mhc.config import FFNConfig, ModelConfig
from mhc.model import MHCModel

G, C = 3, 4
BACKENDS = ["torch", "triton"]
MIN_RATIO = 1e-4  # level-1 gradient norm over the level-2 routers' gradient norm


def _cfg(kind: str, k1: int) -> ModelConfig:
    ffn = FFNConfig(kind=kind, hidden=16, n_domains=G, n_components=C, k1=k1, k2=2,
                    segment_len=8, aux_loss_coef=0.0, z_loss_coef=0.0, domain_label_coef=0.0,
                    domain_distill_coef=0.0)
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, ffn=ffn)


def _level1_params(model: MHCModel) -> dict[str, torch.Tensor]:
    """name -> gradient of the level-1 routing parameters (hierarchical: the G domain columns
    of every router; progressive: the encoder's parameters)."""
    if model.domain_encoder is not None:
        return {n: p.grad for n, p in model.domain_encoder.named_parameters()}
    return {f"blocks.{i}.router[:, :G]": b.ffn.router.weight_DR.grad[:, :G]
            for i, b in enumerate(model.blocks)}


def _lm_grads(model: MHCModel, idx, backend: str, labels=None):
    prev = kernels.backend()
    try:
        kernels.set_backend(backend)
        model.zero_grad(set_to_none=True)
        out = model(idx[:, :-1], idx[:, 1:], domain_targets=labels)
        assert float(out.router_loss.detach()) == 0.0  # the LM loss alone drives the gradient
        out.lm_loss.backward()
        return out.lm_loss.detach(), {n: g.clone() for n, g in _level1_params(model).items()}
    finally:
        kernels.set_backend(prev)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 33), generator=g), torch.tensor([0, 2, 1])


def _level2_norm(model: MHCModel) -> float:
    first = 0 if model.domain_encoder is not None else G  # progressive routers: E columns only
    return float(sum(b.ffn.router.weight_DR.grad[:, first:].norm() ** 2
                     for b in model.blocks) ** 0.5)


def _assert_level1_learns(model, grads, what):
    level2 = _level2_norm(model)
    assert level2 > 0
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient"
        assert torch.isfinite(grad).all(), name
        ratio = float(grad.norm()) / level2
        assert ratio > MIN_RATIO, f"{name}: LM-loss gradient {ratio:.1e} of level 2's ({what})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,k1", [("hierarchical", 1), ("hierarchical", 2),
                                     ("progressive", 1), ("progressive", 2)])
def test_lm_loss_reaches_level1_router(kind, k1, backend):
    torch.manual_seed(0)
    model = MHCModel(_cfg(kind, k1))
    idx, labels = _inputs(1)
    _, grads = _lm_grads(model, idx, backend, labels)
    _assert_level1_learns(model, grads, f"{kind}, k1={k1}, {backend}")


@pytest.mark.parametrize("kind", ["hierarchical", "progressive"])
def test_threshold_rejects_cancelled_gradient(kind, monkeypatch):
    """The old weights (p(g)·p(c|g) renormalized over all K picks) at k1 = 1: p(g) cancels and
    the check above must fail — it can tell a learning level 1 from a cancelled one."""
    from kernels.routing import reference

    gate = reference.gate

    def renormalized_across_levels(logits, spec, bias=None, forced=None):
        _, ids = gate(logits, spec, bias, forced)
        T = logits.shape[0]
        p_TG = torch.softmax(logits[:, :G].float(), -1)
        p_TE = torch.softmax(logits[:, G:].float().view(T, G, C), -1).view(T, -1)
        w = p_TG.gather(1, ids // C) * p_TE.gather(1, ids)
        return (w / w.sum(-1, keepdim=True)).to(logits.dtype), ids

    monkeypatch.setattr(reference, "gate", renormalized_across_levels)
    torch.manual_seed(0)
    model = MHCModel(_cfg(kind, 1))
    idx, labels = _inputs(1)
    _, grads = _lm_grads(model, idx, "torch", labels)
    with pytest.raises(AssertionError, match="LM-loss gradient"):
        _assert_level1_learns(model, grads, "old weights")


@pytest.mark.parametrize("kind,k1", [("hierarchical", 1), ("hierarchical", 2),
                                     ("progressive", 1)])
def test_level1_gradient_matches_finite_difference(kind, k1):
    """d lm_loss along a random direction of the level-1 parameters, autograd vs a central
    difference (float64 model and loss, reference routing; the step is small enough to keep
    every pick: domains and expert loads are checked unchanged)."""
    torch.manual_seed(2)
    model = MHCModel(_cfg(kind, k1)).double()
    idx, labels = _inputs(3)
    if model.domain_encoder is not None:
        params = list(model.domain_encoder.parameters())
        views = [p.data for p in params]
    else:
        params = [b.ffn.router.weight_DR for b in model.blocks]
        views = [p.data[:, :G] for p in params]

    def lm_loss():  # in the model's float64 (the model's own lm_loss is computed in fp32)
        out = model(idx[:, :-1], domain_targets=labels)
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                               idx[:, 1:].reshape(-1))
        return loss, [torch.cat([a.counts_E, a.domain_ids_TK1.flatten()]) for a in out.layers]

    loss, picks = lm_loss()
    loss.backward()
    grads = [p.grad if model.domain_encoder is not None else p.grad[:, :G] for p in params]

    def unit(ts):
        norm = sum(float(t.square().sum()) for t in ts) ** 0.5
        return [t / max(norm, 1e-300) for t in ts]

    # A random unit direction plus the gradient's own: the random part checks components a
    # descent step would not probe; the gradient part keeps the derivative far above the
    # central difference's rounding wherever the gradient is not (wrongly) zero.
    gen = torch.Generator().manual_seed(4)
    random_dir = unit([torch.randn(v.shape, generator=gen, dtype=v.dtype) for v in views])
    direction = unit([r + g for r, g in zip(random_dir, unit(grads), strict=True)])
    analytic = float(sum((g * d).sum() for g, d in zip(grads, direction, strict=True)))

    def loss_at(step: float) -> float:
        for v, d in zip(views, direction, strict=True):
            v.add_(step * d)
        with torch.no_grad():
            loss, picks_here = lm_loss()
        for v, d in zip(views, direction, strict=True):
            v.sub_(step * d)
        for a, b in zip(picks, picks_here, strict=True):  # same domains, same expert loads
            assert torch.equal(a, b), "the finite-difference step changed a pick"
        return float(loss)

    # float64: the loss rounds at ~1e-15, ~1e-10 of the difference at this step; a larger step
    # along the gradient part would change a pick
    eps = 1e-5
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-8
    assert numeric == pytest.approx(analytic, rel=1e-5)


@pytest.mark.parametrize("kind,k1", [("hierarchical", 1), ("hierarchical", 2),
                                     ("progressive", 1)])
def test_level1_gradient_triton_equals_reference(kind, k1):
    torch.manual_seed(5)
    model = MHCModel(_cfg(kind, k1))
    idx, labels = _inputs(6)
    loss_t, grads_t = _lm_grads(model, idx, "triton", labels)
    loss_r, grads_r = _lm_grads(model, idx, "torch", labels)
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], rtol=1e-3, atol=1e-6,
                                   msg=name)
