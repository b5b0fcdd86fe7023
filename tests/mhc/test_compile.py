"""``torch.compile(model, fullgraph=True)`` traces the whole model for every FFN kind, with
the Triton routing ops (custom ops; the CPU interpreter here) and with the torch reference,
and the compiled forward and backward equal the eager ones.

On CPU the ``aot_eager`` backend is used: Dynamo captures the full graph (``fullgraph=True``
fails on any graph break, host sync or untraceable op) and AOTAutograd traces the backward
through the ops' fake implementations and registered autograd, exactly what Inductor would
receive; only Inductor's code generation is left to the GPU test
(``test_gpu_training_step.py``).
"""

from __future__ import annotations

import pytest
import torch

import kernels
from mhc.config import FFN_KINDS, FFNConfig, ModelConfig
from mhc.model import MHCModel


def small_config(kind: str, sharing: str = "none") -> ModelConfig:
    ffn = FFNConfig(kind=kind, hidden=16, n_domains=2, n_components=4,
                    k1=2 if kind == "group_limited" else 1, k2=2, sharing=sharing,
                    lowrank_rank=4, segment_len=8, bias_balancing=True)
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, ffn=ffn)


def _step(model, run, idx, labels):
    model.zero_grad(set_to_none=True)
    out = run(idx[:, :-1], idx[:, 1:], labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", FFN_KINDS)
def test_compiled_model_equals_eager(kind, backend):
    prev = kernels.backend()
    try:
        kernels.set_backend(backend)
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MHCModel(small_config(kind))
        g = torch.Generator().manual_seed(1)
        idx = torch.randint(0, 256, (2, 17), generator=g)
        labels = torch.tensor([0, 5])  # 5 is outside [0, G): an unknown domain
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out_c, grads_c = _step(model, compiled, idx, labels)
        out_e, grads_e = _step(model, model, idx, labels)
        torch.testing.assert_close(out_c.loss, out_e.loss)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], msg=name)
        for a, b in zip(out_c.layers, out_e.layers, strict=True):  # router statistics too
            if b.counts_E is not None:
                assert torch.equal(a.counts_E, b.counts_E)
    finally:
        kernels.set_backend(prev)
