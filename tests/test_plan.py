"""Bound step plans: the same bits as the one-shot calls, a cheap guard of the bound buffers,
gradients given per step, and every check before any byte is written."""

from __future__ import annotations

import numpy as np
import pytest

import fastradam
from fastradam import FlatLayout, StepPlan, fused_step, fused_step_layout, fused_step_multi
from tests.cases import random_buffers
from tests.oracle_check import assert_matches_oracle


def _copies(buffers):
    return [b.copy() for b in buffers]


def _same(left, right) -> bool:
    return all(a.tobytes() == b.tobytes() for a, b in zip(left, right))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_plan_steps_as_the_one_shot_call(dtype):
    ours = list(random_buffers(1027, dtype, seed=1))
    theirs = _copies(ours)
    plan = StepPlan(*ours, lr=1e-2, weight_decay=0.1, eps_root=1e-7)
    for step in range(1, 12):
        plan.step(step=step)
        fused_step(*theirs, step=step, lr=1e-2, weight_decay=0.1, eps_root=1e-7)
    assert _same(ours, theirs)


def test_flat_plan_takes_a_new_lr_per_step_without_keeping_it():
    ours = list(random_buffers(100, np.float32, seed=2))
    theirs = _copies(ours)
    plan = StepPlan(*ours, lr=1e-3)
    plan.step(step=7, lr=5e-2)
    plan.step(step=8)
    fused_step(*theirs, step=7, lr=5e-2)
    fused_step(*theirs, step=8, lr=1e-3)
    assert _same(ours, theirs)


def test_layout_plan_steps_as_the_one_shot_call():
    layout = FlatLayout([(3, 5), (0,), (70,), (1,)], groups=[0, 1, 1, 0])
    groups = [{"lr": 1e-2}, {"lr": 3e-3, "eps_root": 1e-6, "flavour": "optax"}]
    ours = list(random_buffers(layout.size, np.float32, seed=3))
    theirs = _copies(ours)
    plan = StepPlan(*ours, layout=layout, groups=groups)
    for step in range(1, 9):
        has_grad = np.array([True, True, step % 2 == 0, True])
        plan.step(steps=np.full(4, step), has_grad=has_grad)
        fused_step_layout(layout, *theirs, steps=np.full(4, step), groups=groups, has_grad=has_grad)
    assert _same(ours, theirs)


def test_tensor_plan_with_gradients_given_per_step_matches_the_oracle():
    sizes = (1, 17, 1000, 3)
    tensors = [list(random_buffers(n, np.float32, seed=10 + n)) for n in sizes]
    params, _, exp_avg, exp_avg_sq = ([t[k] for t in tensors] for k in range(4))
    plan = StepPlan(params, None, exp_avg, exp_avg_sq, lr=1e-2)
    rng = np.random.default_rng(4)
    for step in (1, 2, 9):
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        has_grad = np.array([True, step != 2, True, True])
        before = [(p.copy(), g, m.copy(), v.copy()) for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq)]
        given = [g if active else None for g, active in zip(grads, has_grad)]
        plan.step(steps=np.full(4, step), has_grad=has_grad, grads=given)
        for i, old in enumerate(before):
            if has_grad[i]:
                assert_matches_oracle(old, (params[i], exp_avg[i], exp_avg_sq[i]), {"step": step, "lr": 1e-2})
            else:
                assert _same((params[i], exp_avg[i], exp_avg_sq[i]), (old[0], old[2], old[3]))


def test_tensor_plan_checks_the_gradients_it_is_given():
    tensors = [list(random_buffers(n, np.float32, seed=n)) for n in (5, 9)]
    params, grads, exp_avg, exp_avg_sq = ([t[k] for t in tensors] for k in range(4))
    plan = StepPlan(params, None, exp_avg, exp_avg_sq)
    snapshot = _copies(params + exp_avg + exp_avg_sq)
    steps = np.array([1, 1])
    with pytest.raises(TypeError, match="bound without gradients"):
        plan.step(steps=steps)
    with pytest.raises(TypeError, match=r"grads\[1\] is None, but has_grad is True"):
        plan.step(steps=steps, grads=[grads[0], None])
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(5,\) but params\[1\] has \(9,\)"):
        plan.step(steps=steps, grads=[grads[0], grads[0]])
    with pytest.raises(TypeError, match="float64"):
        plan.step(steps=steps, grads=[g.astype(np.float64) for g in grads])
    with pytest.raises(ValueError, match=r"grads\[0\] and exp_avg\[0\] share memory"):
        plan.step(steps=steps, grads=[exp_avg[0], grads[1]])
    with pytest.raises(ValueError, match=r"grads\[1\] and params\[1\] share memory"):
        plan.step(steps=steps, grads=[grads[0], params[1][::-1][::-1]])
    assert _same(params + exp_avg + exp_avg_sq, snapshot)
    plan.step(steps=steps, grads=grads)
    assert not _same(params, snapshot[:2])


def test_a_bound_buffer_resized_or_made_read_only_is_refused_before_any_write():
    buffers = list(random_buffers(64, np.float32, seed=5))
    plan = StepPlan(*buffers)
    snapshot = _copies(buffers)
    buffers[3].flags.writeable = False
    with pytest.raises(ValueError, match="exp_avg_sq changed after the plan was bound"):
        plan.step(step=1)
    buffers[3].flags.writeable = True
    buffers[2].resize(32, refcheck=False)
    with pytest.raises(ValueError, match="exp_avg changed after the plan was bound"):
        plan.step(step=1)
    assert _same([buffers[0], buffers[1], buffers[3]], [snapshot[0], snapshot[1], snapshot[3]])


def test_a_bad_argument_at_step_writes_nothing():
    buffers = list(random_buffers(64, np.float32, seed=6))
    plan = StepPlan(*buffers)
    snapshot = _copies(buffers)
    for kwargs, error in (({"step": 0}, ValueError), ({"step": 1, "lr": -1.0}, ValueError),
                          ({"step": 1, "grad_scale": 0.0}, ValueError), ({"steps": [1]}, TypeError),
                          ({"step": 1, "groups": [{"eps": float("nan")}]}, ValueError)):
        with pytest.raises(error):
            plan.step(**kwargs)
    assert _same(buffers, snapshot)


def test_groups_given_again_are_checked_where_they_changed():
    layout = FlatLayout([(8,), (8,)], groups=[0, 1])
    buffers = list(random_buffers(layout.size, np.float32, seed=7))
    groups = [{"lr": 1e-3}, {"lr": 1e-2}]
    plan = StepPlan(*buffers, layout=layout, groups=groups)
    plan.step(steps=[1, 1], groups=groups)
    with pytest.raises(ValueError, match=r"groups\[1\]\.lr must be finite and >= 0"):
        plan.step(steps=[2, 2], groups=[groups[0], {"lr": -1.0}])
    with pytest.raises(ValueError, match="groups must be a sequence of 2"):
        plan.step(steps=[2, 2], groups=groups[:1])


def test_prepared_steps_of_several_plans_write_nothing_until_all_are_checked():
    """A caller that steps several plans as one prepares them all first."""
    first = list(random_buffers(32, np.float32, seed=8))
    second = list(random_buffers(32, np.float32, seed=9))
    plans = [StepPlan(*first), StepPlan(*second)]
    snapshot = _copies(first + second)
    launches = [plans[0].prepare(step=3)]
    with pytest.raises(ValueError):
        launches.append(plans[1].prepare(step=0))
    assert _same(first + second, snapshot)
    launches[0]()
    assert not _same(first, snapshot[:4]) and _same(second, snapshot[4:])


def test_plan_refuses_mixed_ways_of_giving_options():
    buffers = list(random_buffers(8, np.float32, seed=10))
    with pytest.raises(TypeError, match="either per group"):
        StepPlan(*buffers, groups=[{}], lr=1e-3)
    with pytest.raises(TypeError, match="grads must be a NumPy array"):
        StepPlan(buffers[0], None, buffers[2], buffers[3])
    with pytest.raises(ValueError, match="flat buffers take one group"):
        StepPlan(*buffers, groups=[{}, {}])


def test_fused_step_multi_is_a_one_shot_tensor_plan():
    tensors = [list(random_buffers(n, np.float32, seed=n)) for n in (3, 33)]
    ours = [[t[k] for t in tensors] for k in range(4)]
    theirs = [[b.copy() for b in role] for role in ours]
    fused_step_multi(*ours, steps=[4, 4], groups=[{"eps_root": 1e-6}])
    StepPlan(*theirs, eps_root=1e-6).step(steps=[4, 4])
    assert all(_same(a, b) for a, b in zip(ours, theirs))


def test_plan_is_exported():
    assert fastradam.StepPlan is StepPlan and "StepPlan" in fastradam.__all__


def test_a_bound_buffer_reinterpreted_is_refused():
    buffers = list(random_buffers(64, np.float32, seed=11))
    plan = StepPlan(*buffers)
    buffers[0].dtype = np.int32  # same bytes, another dtype
    with pytest.raises(ValueError, match="params changed after the plan was bound"):
        plan.step(step=1)


def test_groups_of_a_failed_step_are_not_kept():
    layout = FlatLayout([(8,)])
    buffers = list(random_buffers(layout.size, np.float32, seed=12))
    ours, theirs = buffers, _copies(buffers)
    plan = StepPlan(*ours, layout=layout, groups=[{"lr": 1e-3}])
    with pytest.raises(ValueError, match="steps must be in"):
        plan.step(steps=[0], groups=[{"lr": 0.5}])
    plan.step(steps=[1])
    fused_step_layout(layout, *theirs, steps=[1], groups=[{"lr": 1e-3}])
    assert _same(ours, theirs)


def test_options_changed_in_place_are_checked_again():
    layout = FlatLayout([(8,)])
    buffers = list(random_buffers(layout.size, np.float32, seed=13))
    groups = [{"betas": [0.9, 0.999]}]
    plan = StepPlan(*buffers, layout=layout, groups=groups)
    groups[0]["betas"][0] = 1.5
    with pytest.raises(ValueError, match=r"betas\[0\] must be in \[0, 1\)"):
        plan.step(steps=[1], groups=groups)


def test_host_steps_of_any_array_type_take_the_host_path():
    torch = pytest.importorskip("torch")
    layout = FlatLayout([(5,), (7,)])
    ours = list(random_buffers(layout.size, np.float32, seed=14))
    theirs = _copies(ours)
    fused_step_layout(layout, *ours, steps=torch.tensor([3, 3]))
    fused_step_layout(layout, *theirs, steps=np.array([3, 3]))
    assert _same(ours, theirs)


# --- The outcome of a binding's checks, kept by the buffers' fingerprints -----------------------


def test_buffers_checked_before_are_refused_once_they_changed():
    """A repeated one-shot step skips the checks its buffers' fingerprints settle; whatever changed
    is checked again, and refused before any write."""
    buffers = list(random_buffers(257, np.float32, seed=21))
    fused_step(*buffers, step=1)
    buffers[2].flags.writeable = False
    snapshot = _copies(buffers)
    with pytest.raises(ValueError, match="exp_avg is read-only"):
        fused_step(*buffers, step=2)
    assert _same(buffers, snapshot)
    buffers[2].flags.writeable = True
    fused_step(*buffers, step=2)
    with pytest.raises(TypeError, match="dtype"):
        fused_step(buffers[0], buffers[1].astype(np.float64), buffers[2], buffers[3], step=3)


def test_views_like_checked_arrays_are_checked_for_overlap():
    """Arrays that own their memory cannot overlap, so their checks are kept by shape and dtype alone;
    views of one buffer with those very shapes and dtypes are still checked for overlap."""
    owned = list(random_buffers(100, np.float32, seed=22))
    fused_step(*owned, step=1)
    base = np.concatenate(owned)
    views = [base[0:100], base[100:200], base[200:300], base[250:350]]  # exp_avg and exp_avg_sq overlap
    snapshot = base.copy()
    with pytest.raises(ValueError, match="exp_avg and exp_avg_sq share memory"):
        fused_step(*views, step=2)
    assert base.tobytes() == snapshot.tobytes()
    fused_step(*(base[k * 100:(k + 1) * 100] for k in range(4)), step=2)  # disjoint views: fine


def test_the_checks_kept_hold_no_buffer():
    """Nothing the one-shot step keeps refers to a buffer: freed arrays are freed, and an array stepped
    before can still be resized in place (NumPy refuses that while anything else refers to it)."""
    import gc
    import weakref

    buffers = list(random_buffers(64, np.float32, seed=23))
    fused_step(*buffers, step=1)
    probe = weakref.ref(buffers[0])
    del buffers[0]
    gc.collect()
    assert probe() is None
    buffers = list(random_buffers(64, np.float32, seed=24))
    fused_step(*buffers, step=1)
    buffers[1].resize(32, refcheck=False)
    assert buffers[1].shape == (32,)


def test_the_checks_of_addressed_buffers_are_kept_by_their_addresses():
    """Device arrays and torch tensors (here CPU tensors, standing in for CUDA ones) are kept by their
    fingerprints, which hold their addresses: an object over another buffer's memory is another key,
    so its overlap is checked; NumPy views are never kept."""
    torch = pytest.importorskip("torch")
    from fastradam import plan

    tensors = [torch.from_numpy(b) for b in random_buffers(64, np.float32, seed=25)]
    key, _ = plan._checks_key(plan.BUFFER_NAMES, True, tensors)
    aliased, _ = plan._checks_key(plan.BUFFER_NAMES, True, tensors[:3] + [tensors[2].view(-1)])
    assert key is not None and aliased is not None and key != aliased
    assert key == plan._checks_key(plan.BUFFER_NAMES, True, list(tensors))[0]
    views = list(np.zeros((4, 64), np.float32))
    assert plan._checks_key(plan.BUFFER_NAMES, True, views)[0] is None
