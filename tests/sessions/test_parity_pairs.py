"""benchmarks/train_kernels_parity.py's replicate pairs against a direct numpy computation:
every Triton run against every torch run, every pair of runs of one backend."""

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.train_kernels_parity import replicate_pairs


@settings(max_examples=40, deadline=None)
@given(n_tri=st.integers(1, 3), n_ref=st.integers(1, 4), steps=st.integers(1, 30),
       seed=st.integers(0, 2**31 - 1))
def test_pairs_match_a_direct_computation(n_tri, n_ref, steps, seed):
    rng = np.random.default_rng(seed)
    tri = ["triton"] + [f"triton_{i}" for i in range(2, n_tri + 1)]
    ref = ["torch"] + [f"torch_{i}" for i in range(2, n_ref + 1)]
    curves = {k: list(rng.uniform(1.0, 3.0, steps)) for k in tri + ref}
    got = replicate_pairs(curves)
    want_cross = list(itertools.product(tri, ref))
    want_within = list(itertools.combinations(tri, 2)) + list(itertools.combinations(ref, 2))
    assert [tuple(p["pair"]) for p in got["cross"]] == want_cross
    assert sorted(tuple(p["pair"]) for p in got["within"]) == sorted(want_within)
    for p in got["cross"] + got["within"]:
        a, b = (np.array(curves[k]) for k in p["pair"])
        assert np.isclose(p["max_abs"], np.abs(a - b).max())
        assert np.isclose(p["mean_abs"], np.abs(a - b).mean())
        assert np.isclose(p["final_rel"], abs(a[-1] - b[-1]) / b[-1])
