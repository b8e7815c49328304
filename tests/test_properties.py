"""Property-based tests: random shapes, hyperparameters and magnitudes against the oracle."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fastradam import PRESETS, FlatLayout, fused_step, fused_step_layout
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


group_options = st.fixed_dictionaries(
    {},
    optional={
        "lr": st.floats(0.0, 0.1),
        "betas": betas,
        "eps": st.sampled_from([0.0, 1e-8, 1e-3]),
        "weight_decay": st.sampled_from([0.0, 0.1]),
        "decoupled_weight_decay": st.booleans(),
        "maximize": st.booleans(),
        "flavour": st.sampled_from(sorted(PRESETS)),
    },
)


@settings(max_examples=60)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    groups=st.lists(group_options, min_size=1, max_size=3),
    dtype=st.sampled_from([np.float32, np.float64]),
    data=st.data(),
)
def test_any_layout_matches_the_oracle_segment_by_segment(sizes, groups, dtype, data):
    count = len(sizes)
    tensor_groups = data.draw(st.lists(st.integers(0, len(groups) - 1), min_size=count, max_size=count))
    steps = data.draw(st.lists(st.integers(1, 2000), min_size=count, max_size=count))
    has_grad = np.array(data.draw(st.lists(st.booleans(), min_size=count, max_size=count)))
    align = data.draw(st.sampled_from([1, 3, 64]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tensors = [[rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(n) * 0.1,
                rng.uniform(0.01, 1.0, n)] for n in sizes]
    layout = FlatLayout([(n,) for n in sizes], groups=tensor_groups, align=align)
    flats = [layout.pack([np.asarray(t[k], dtype) for t in tensors]) for k in range(4)]
    before = [f.copy() for f in flats]
    fused_step_layout(layout, *flats, steps=steps, groups=groups, has_grad=has_grad)
    for i, segment in enumerate(layout.segments):
        part = slice(segment.offset, segment.offset + segment.size)
        old = tuple(b[part] for b in before)
        new = (flats[0][part], flats[2][part], flats[3][part])
        if has_grad[i]:
            assert_matches_oracle(old, new, {"step": steps[i], **groups[tensor_groups[i]]})
        else:
            assert all(a.tobytes() == b.tobytes() for a, b in zip(new, (old[0], old[2], old[3])))
