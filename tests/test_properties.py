"""Property-based tests: random shapes, hyperparameters and magnitudes against the oracle."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fastradam import PRESETS, fused_step
from tests.oracle_check import assert_matches_oracle

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
betas = st.tuples(
    st.one_of(st.floats(0.0, 0.999), st.just(0.0)),
    st.one_of(st.floats(0.0, 0.99999), st.sampled_from([0.0, 0.9, 0.999, 0.99999])),
)
steps = st.one_of(st.integers(1, 12), st.integers(1, 10**7))
hyperparameters = st.fixed_dictionaries(
    {
        "step": steps,
        "lr": st.floats(0.0, 1.0),
        "betas": betas,
        "eps": st.sampled_from([0.0, 1e-8, 1e-6, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 1e-4, 0.1, 1.0]),
        "decoupled_weight_decay": st.booleans(),
        "maximize": st.booleans(),
        "flavour": st.sampled_from(sorted(PRESETS)),
    }
)


@settings(max_examples=300)
@given(
    shape=shapes,
    dtype=st.sampled_from([np.float32, np.float64]),
    hyper=hyperparameters,
    log_grad_scale=st.integers(-12, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_shape_and_hyperparameters_match_the_oracle(shape, dtype, hyper, log_grad_scale, seed):
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    scale = 10.0**log_grad_scale
    buffers = [
        rng.standard_normal(size),
        rng.standard_normal(size) * scale,
        rng.standard_normal(size) * scale,
        rng.uniform(0.1, 1.0, size) * scale**2,
    ]
    buffers = [np.asarray(b, dtype=dtype).reshape(shape) for b in buffers]
    before = tuple(b.copy() for b in buffers)
    fused_step(*buffers, **hyper)
    assert_matches_oracle(before, (buffers[0], buffers[2], buffers[3]), hyper)
