"""bf16 compute copies of the fp32 expert weights (``mhc.compute_copies``): made once per
optimizer step, never stale, gradients reaching the fp32 masters exactly as a per-call cast's.

Runs under CPU autocast (bf16), where the FFN computes in bf16 like on the GPU.
"""

from __future__ import annotations

import torch

from mhc import compute_copies
from mhc.compute_copies import compute_weight
from mhc.config import FFNConfig, ModelConfig
from mhc.model import MHCModel


def _model():
    ffn = FFNConfig(kind="hierarchical", hidden=16, n_domains=2, n_components=4, k1=1, k2=2)
    torch.manual_seed(0)
    return MHCModel(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, ffn=ffn))


def _copy(model, name="w_gate_up_PDH"):
    return model.blocks[0].ffn.experts._compute_copies[name][1]


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
    master = model.blocks[0].ffn.experts.w_gate_up_PDH
    assert _copy(model) is not first
    assert torch.equal(_copy(model), master.detach().bfloat16())


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


def test_copies_follow_every_kind_of_update():
    model = _model()
    idx = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    experts = model.blocks[0].ffn.experts

    def fresh():
        with torch.no_grad():
            _forward(model, idx)
        return torch.equal(_copy(model), experts.w_gate_up_PDH.detach().bfloat16())

    assert fresh()
    with torch.no_grad():
        experts.w_gate_up_PDH.mul_(2)  # in place under no_grad: the version counter moves
    assert fresh()
    state = {k: v.clone() * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert fresh()
    experts.w_gate_up_PDH.data.add_(1)  # .data escapes the version counter ...
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
    assert model.blocks[0].ffn.experts.w_gate_up_PDH.grad.dtype == torch.float32
