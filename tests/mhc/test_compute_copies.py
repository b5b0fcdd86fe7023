"""bf16 compute copies of the fp32 expert weights (``mhc.compute_copies``): made once per
optimizer step, never stale, gradients reaching the fp32 masters exactly as a per-call cast's.

Runs under CPU autocast (bf16), where the FFN computes in bf16 like on the GPU.
"""

from __future__ import annotations

import torch

from mhc import compute_copies
from mhc.compute_copies import compute_concat, compute_weight
from mhc.config import FFNConfig, ModelConfig
from mhc.model import MHCModel


def _model():
    ffn = FFNConfig(kind="hierarchical", hidden=16, n_domains=2, n_components=4, k1=1, k2=2)
    torch.manual_seed(0)
    return MHCModel(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, ffn=ffn))


def _copy(model):
    """Layer 0's cached bf16 ``[W_gate | W_up]`` (the experts' fused gate/up weight)."""
    return model.blocks[0].ffn.experts._compute_copies["w_gate_PDF|w_up_PDF"][1]


def _fresh_copy_of(experts) -> torch.Tensor:
    return torch.cat([experts.w_gate_PDF, experts.w_up_PDF], -1).detach().bfloat16()


def _forward(model, idx):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(idx[:, :-1], idx[:, 1:])


def test_one_copy_per_optimizer_step():
    model = _model()
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    _forward(model, idx).loss.backward()
    first = _copy(model)
    assert first.dtype == torch.bfloat16
    _forward(model, idx).loss.backward()  # gradient accumulation: no new copy
    assert _copy(model) is first
    opt.step()  # fused AdamW moves no version counter: the step hook must invalidate
    with torch.no_grad():
        _forward(model, idx)
    assert _copy(model) is not first
    assert torch.equal(_copy(model), _fresh_copy_of(model.blocks[0].ffn.experts))


def test_gradients_equal_a_per_call_cast():
    g = torch.Generator().manual_seed(2)
    master = torch.nn.Parameter(torch.randn(3, 8, 4, generator=g))
    x = torch.randn(3, 5, 8, generator=g).bfloat16()
    cache = {}
    (x @ compute_weight(cache, "w", master, torch.bfloat16)).float().square().sum().backward()
    cached_grad = master.grad.clone()
    master.grad = None
    (x @ master.to(torch.bfloat16)).float().square().sum().backward()
    assert cached_grad.dtype == torch.float32
    assert torch.equal(cached_grad, master.grad)


def test_concat_gradients_equal_per_call_casts():
    """``compute_concat``: cached, under inference and while capturing (the uncached path),
    the same values and the same fp32 gradients as ``torch.cat`` of per-call casts."""
    g = torch.Generator().manual_seed(5)
    a = torch.nn.Parameter(torch.randn(3, 8, 4, generator=g))
    b = torch.nn.Parameter(torch.randn(3, 8, 6, generator=g))
    x = torch.randn(3, 5, 8, generator=g).bfloat16()
    dy = torch.randn(3, 5, 10, generator=g)

    def grads(w):
        (x @ w).float().mul(dy).sum().backward()
        out = (a.grad.clone(), b.grad.clone())
        a.grad = b.grad = None
        return out

    plain = torch.cat([a.to(torch.bfloat16), b.to(torch.bfloat16)], -1)
    cache = {}
    cached = compute_concat(cache, "ab", [a, b], torch.bfloat16)
    assert torch.equal(cached, plain) and "ab" in cache
    uncached = compute_copies._Concat.apply(None, torch.bfloat16, a, b)
    assert torch.equal(uncached, plain)
    want = grads(plain)
    for got in (grads(cached), grads(uncached)):
        for g_, w_ in zip(got, want, strict=True):
            assert g_.dtype == torch.float32 and torch.equal(g_, w_)
    with torch.inference_mode():
        assert torch.equal(compute_concat({}, "ab", [a, b], torch.bfloat16), plain)


def test_copies_follow_every_kind_of_update():
    model = _model()
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    experts = model.blocks[0].ffn.experts

    def fresh():
        with torch.no_grad():
            _forward(model, idx)
        return torch.equal(_copy(model), _fresh_copy_of(experts))

    assert fresh()
    with torch.no_grad():
        experts.w_gate_PDF.mul_(2)  # in place under no_grad: the version counter moves
    assert fresh()
    state = {k: v.clone() * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert fresh()
    experts.w_gate_PDF.data.add_(1)  # .data escapes the version counter ...
    compute_copies.invalidate()  # ... which is why invalidate() exists
    assert fresh()


def test_no_copies_under_compile_or_inference():
    model = _model()
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx[:, :-1])
    assert model.blocks[0].ffn.experts._compute_copies == {}
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(idx[:, :-1], idx[:, 1:])
    out.loss.backward()
    assert model.blocks[0].ffn.experts._compute_copies == {}
    assert model.blocks[0].ffn.experts.w_gate_PDF.grad.dtype == torch.float32
