"""Multi-tensor steps (a flat layout, a tensor list) against the oracle, tensor by tensor."""

from __future__ import annotations

import numpy as np
import pytest

from fastradam import FlatLayout, fused_step_layout, fused_step_multi
from tests.cases import random_buffers
from tests.oracle_check import assert_matches_oracle

SHAPES = [(0,), (1,), (3,), (63,), (64,), (65,), (7, 11), (1000,), (4099,), (2, 3, 4), (70000,)]
GROUPS = [
    {"lr": 1e-2},
    {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"lr": 1e-3, "weight_decay": 0.05, "maximize": True, "flavour": "authors"},
]


def _tensors(dtype, seed):
    """Per tensor (p, g, m, v), random, with the group of each tensor and its step."""
    quads = [tuple(b.reshape(shape) for b in random_buffers(int(np.prod(shape)), dtype, seed + i))
             for i, shape in enumerate(SHAPES)]
    # groups and steps are fixed, so every group meets both sides of its flavour's threshold
    groups = np.arange(len(SHAPES)) % len(GROUPS)
    steps = np.resize([1, 6, 1000, 5, 9, 1000, 4, 30, 1000, 2, 7, 100], len(SHAPES))
    return quads, groups, steps


def _hyper(group, step):
    return {"step": int(step), **GROUPS[group]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layout_step_matches_the_oracle_per_segment(dtype):
    quads, groups, steps = _tensors(dtype, seed=1)
    has_grad = np.ones(len(SHAPES), dtype=bool)
    has_grad[[2, 7]] = False
    layout = FlatLayout([q[0].shape for q in quads], groups=groups)
    flats = [layout.pack([q[k] for q in quads]) for k in range(4)]
    padding = np.ones(layout.size, dtype=bool)
    for s in layout.segments:
        padding[s.offset:s.offset + s.size] = False
    for flat in flats:
        flat[padding] = np.nan  # a sentinel no step may touch
    before = [f.copy() for f in flats]

    fused_step_layout(layout, *flats, steps=steps, groups=GROUPS, has_grad=has_grad)

    for flat, old in zip(flats, before):
        assert flat[padding].tobytes() == old[padding].tobytes(), "padding changed"
    for i, quad in enumerate(quads):
        after = [layout.unpack(f)[i] for f in (flats[0], flats[2], flats[3])]
        if not has_grad[i]:
            for new, old in zip(after, (quad[0], quad[2], quad[3])):
                assert new.tobytes() == old.tobytes(), f"skipped segment {i} changed"
            continue
        assert_matches_oracle(quad, after, _hyper(groups[i], steps[i]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tensor_list_step_matches_the_oracle_per_tensor(dtype):
    quads, groups, steps = _tensors(dtype, seed=2)
    # an unaligned view, so not every tensor starts on a vector boundary
    base = random_buffers(SHAPES[5][0] + 1, dtype, 99)
    quads[5] = tuple(b[1:] for b in base)
    work = [tuple(x.copy() if i != 5 else x for x in q) for i, q in enumerate(quads)]
    originals = [tuple(x.copy() for x in q) for q in quads]
    has_grad = np.arange(len(SHAPES)) % 4 != 3
    fused_step_multi(*([w[k] for w in work] for k in range(4)), steps=steps, groups=GROUPS,
                     group_index=groups, has_grad=has_grad)
    for i, (w, old) in enumerate(zip(work, originals)):
        if has_grad[i]:
            assert_matches_oracle(old, (w[0], w[2], w[3]), _hyper(groups[i], steps[i]))
        else:
            assert all(a.tobytes() == b.tobytes() for a, b in zip(w, old))


def test_layout_and_single_buffer_agree_bit_for_bit():
    """A layout of one segment is the single-buffer step: same kernel, same rounding."""
    from fastradam import fused_step

    flat = list(random_buffers(5000, np.float32, 3))
    single = [b.copy() for b in flat]
    fused_step(*single, step=7, weight_decay=0.1)
    layout = FlatLayout([(5000,)])
    padded = [layout.pack([b]) for b in flat]
    fused_step_layout(layout, *padded, steps=[7], groups=[{"weight_decay": 0.1}])
    for a, b in zip(single, padded):
        assert a.tobytes() == b[:5000].tobytes()


def _layout_buffers(layout):
    return [layout.pack([np.ones(s.shape) for s in layout.segments]) for _ in range(4)]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"steps": [1, 0]}, ValueError, r"steps must be in \[1, 9007199254740992\]"),
        ({"steps": [1]}, ValueError, "steps must have one entry per tensor"),
        ({"steps": [1.0, 2.0]}, TypeError, "steps must be integers"),
        ({"steps": [1, 1], "groups": [{}]}, ValueError, "tensor 1 is in group 1, but only 1 groups"),
        ({"steps": [1, 1], "groups": [{}, {"lr": -1}]}, ValueError, r"groups\[1\].lr must be finite and >= 0"),
        ({"steps": [1, 1], "groups": [{}, {"momentum": 0.9}]}, ValueError, r"groups\[1\].momentum is not an option"),
        ({"steps": [1, 1], "groups": {}}, TypeError, "groups must be a non-empty sequence"),
        ({"steps": [1, 1], "groups": [{}, {"flavour": "adam"}]}, ValueError, "flavour must be one of"),
        ({"steps": [1, 1], "groups": [{}, {}], "has_grad": [1, 0]}, TypeError, "has_grad must be booleans"),
    ],
)
def test_layout_step_rejects_bad_input_before_writing(kwargs, error, match):
    layout = FlatLayout([(3,), (5,)], groups=[0, 1])
    buffers = _layout_buffers(layout)
    kwargs.setdefault("groups", [{}, {}])
    with pytest.raises(error, match=match):
        fused_step_layout(layout, *buffers, **kwargs)
    assert all((b[:3] == 1).all() and (b[64:69] == 1).all() for b in buffers)


def test_inactive_segments_may_have_step_zero():
    layout = FlatLayout([(3,), (5,)])
    buffers = _layout_buffers(layout)
    fused_step_layout(layout, *buffers, steps=[0, 1], has_grad=[False, True])
    assert (buffers[0][:3] == 1).all() and not (buffers[0][64:69] == 1).all()


def test_layout_size_must_match():
    layout = FlatLayout([(3,), (5,)])
    buffers = [np.ones(100) for _ in range(4)]
    with pytest.raises(ValueError, match="the layout needs 128"):
        fused_step_layout(layout, *buffers, steps=[1, 1])


def test_tensor_list_rejects_overlap_across_tensors_and_mixed_dtypes():
    base = np.ones(20)
    p = [base[:10], base[5:15]]
    rest = [[np.ones(10), np.ones(10)] for _ in range(3)]
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        fused_step_multi(p, *rest, steps=[1, 1])
    assert (base == 1).all()
    mixed = [[np.ones(10), np.ones(10, np.float32)] for _ in range(4)]
    with pytest.raises(TypeError, match=r"params\[1\] has dtype float32"):
        fused_step_multi(*mixed, steps=[1, 1])


def test_tensor_list_lengths_must_match():
    with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
        fused_step_multi([np.ones(2)] * 2, [np.ones(2)], [np.ones(2)] * 2, [np.ones(2)] * 2, steps=[1, 1])


def test_empty_lists_and_layouts_are_fine():
    fused_step_multi([], [], [], [], steps=[])
    layout = FlatLayout([])
    fused_step_layout(layout, *(np.zeros(0) for _ in range(4)), steps=[])
