"""``write_probability`` (the salience loss's and the logged write probability's masked mean)
equals the mean over a boolean index of the valid entries, the host-syncing form it replaces,
in value and in gradient."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from engram.write import write_probability


@given(st.integers(1, 6), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_masked_mean_equals_the_indexed_mean(B, M, seed):
    g = torch.Generator().manual_seed(seed)
    salience = (torch.randn(B, M, generator=g) * 3).requires_grad_()
    valid = torch.rand(B, M, generator=g) < 0.6
    valid[0, 0] = True  # at least one valid entry (the indexed mean of none is NaN)
    got = write_probability(salience, valid)
    (g_got,) = torch.autograd.grad(got, salience)
    want = torch.sigmoid(salience[valid]).mean()
    (g_want,) = torch.autograd.grad(want, salience)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-8)
    assert torch.equal(g_got[~valid], torch.zeros_like(g_got[~valid]))  # invalid: no signal


def test_nothing_valid_reads_zero_and_teaches_nothing():
    salience = torch.randn(2, 3, requires_grad=True)
    p = write_probability(salience, torch.zeros(2, 3, dtype=torch.bool))
    assert float(p) == 0.0
    (grad,) = torch.autograd.grad(p, salience)
    assert torch.equal(grad, torch.zeros_like(grad))
