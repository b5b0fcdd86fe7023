"""Helpers for the routing kernel tests: device choice, per-dtype tolerances, comparisons.

Tolerances (rtol, atol) per dtype, for values computed in fp32 and rounded to the dtype once
or twice (weights: one rounding of a renormalized product; gradients: a few more steps).
"""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 8e-3),
    torch.float16: (2e-3, 1e-3),
}
GRAD_TOL = {
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (5e-2, 2e-2),
    torch.float16: (1e-2, 5e-3),
}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close(actual, expected, dtype=None, table=None, msg=""):
    dtype = dtype or expected.dtype
    rtol, atol = (table or TOL)[dtype]
    kw = {"msg": msg} if msg else {}
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, **kw)


def distinct_ids(T: int, K: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """ids_TK with K distinct experts per token (as the gate produces), skewed over experts."""
    if T == 0:
        return torch.zeros(0, K, dtype=torch.long)
    scores = torch.rand(T, E, generator=gen) + torch.linspace(0, 0.5, E)
    return scores.topk(K, dim=1).indices
