"""Compact master weights for bfloat16 params (issue 17), on the Numba backend.

**Remainders** (Transformer Engine's ``store_param_remainders``, :mod:`fastradam.rounding`): a
bfloat16 param and an int16 remainder are an fp32 master bit for bit. The kernel decodes them,
runs the fp32-master path's arithmetic and splits the result again, so after any number of steps
the joined master, and the moments, equal the fp32-master path's bit for bit, and params and
remainders equal :func:`~fastradam.reference.split_master` of that master. The params shown are
the master rounded to nearest with **ties away from zero**: they differ from the fp32-master
path's nearest-even params exactly where the master's low half is 0x8000 and its high half is
even (one bfloat16 ulp up in magnitude), nowhere else. A NaN master shows as the quiet NaN with
its sign in both paths (its payload is not kept).

**Stochastic rounding** (SR): bfloat16 params, no master; the fp32 result ``y`` is rounded as
``(bits(y) + u) >> 16`` with ``u`` 16 bits hashed from (seed, step, global element index). The
fp32 result is the fp32-master path's master after a step started from the same values (the
bfloat16 params widened exactly are the master it reads, and the arithmetic is the same), so
the SR params are, bit for bit, :func:`~fastradam.reference.stochastic_round_bfloat16` of that
master with :func:`~fastradam.reference.stochastic_round_bits` of each element's global index
(its place in the concatenation of the step's tensors, layout padding not counted). There is no
midpoint rule in SR: every value rounds up in magnitude with probability (low half) / 2**16,
a low half of 0x8000 with probability 1/2 and exact bfloat16 values never move.

The statistical checks use fixed seeds (so they are deterministic) and a 5-sigma binomial bound.
"""

from __future__ import annotations

import numbers

import ml_dtypes
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastradam import FlatLayout, StepPlan, fused_step, fused_step_layout, fused_step_multi
from fastradam.reference import join_master, split_master, stochastic_round_bfloat16, stochastic_round_bits
from fastradam.rounding import check_seed, round_key, splitmix64
from fastradam.scalars import step_scalars
from tests.cases import NUMPY_DTYPES, REMAINDER_STORAGES, STOCHASTIC_STORAGES, random_buffers
from tests.oracle_check import assert_matches_oracle

BF16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32)
assert len(REMAINDER_STORAGES) == len(STOCHASTIC_STORAGES) == 6
#: The storages the multi-tensor entry points (layouts, tensor lists) are run with: all-fp32 and
#: all-bf16 grads and moments (the element loop and the word loop). Every storage's codec runs
#: through the flat tests; each tensor-list storage is one more Numba compilation of 6-25 s on
#: CI's cold cache, and the keeper code is the same for every storage.
MULTI_TENSOR_REMAINDERS = [s for s in REMAINDER_STORAGES if s.grads == s.moments]
#: Sizes that hit the scalar loop, the vector tail, the bfloat16 word pairs' odd tail and a second block.
SIZES = (1, 7, 33, 2**16 + 4)
#: Steps 1..5 stay below the rectification threshold (beta2 = 0.999); 6 and 50 rectify.
STEP_SEQUENCE = (1, 2, 5, 6, 50)
#: The step's options, with fused_step's grad_scale beside them.
OPTIONS = (
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"maximize": True, "weight_decay": 0.05},
    {"grad_scale": 1024.0},
    {"grad_scale": 3000.0, "flavour": "authors"},
    {"eps_root": 1e-6, "eps": 0.0, "flavour": "optax", "betas": (0.5, 0.99)},
)
SIGMAS = 5.0


def _u16(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint16)


def _u32(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint32)


def _same_bits(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Bit for bit, NaN for NaN (a NaN master's payload is not kept)."""
    got_nan, want_nan = np.isnan(got), np.isnan(want)
    assert np.array_equal(got_nan, want_nan), f"{what}: NaN at {np.flatnonzero(got_nan != want_nan)[:8]}"
    got, want = _u32(got)[~got_nan], _u32(want)[~want_nan]
    bad = np.flatnonzero(got != want)
    examples = [(hex(got[i]), hex(want[i])) for i in bad[:4]]
    assert bad.size == 0, f"{what} differs at {bad.size} elements, e.g. {examples}"


def _fresh(storage, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random ``(master, grads, exp_avg, exp_avg_sq)`` in the storage's formats (master fp32):
    the master's low halves uniformly spread, every 7th one an exact tie (0x8000)."""
    p, g, m, v = random_buffers(size, np.float64, seed)
    rng = np.random.default_rng(seed + 1)
    master = p.astype(F32)
    low = rng.integers(1, 2**16, size).astype(np.uint32)
    low[::7] = 0x8000
    _u32(master)[:] = (_u32(master) & np.uint32(0xFFFF0000)) | low
    grads, moments = NUMPY_DTYPES[storage.grads], NUMPY_DTYPES[storage.moments]
    return master, g.astype(grads), m.astype(moments), v.astype(moments)


def _remainder_state(master: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bfloat16 params and int16 remainders holding ``master``."""
    bits, remainders = split_master(master)
    return bits.view(BF16).copy(), remainders.copy()


def _assert_remainders_hold(params, remainders, moments, master, nearest, master_moments) -> None:
    """Params and remainders after a step against the fp32-master path's master, moments and
    nearest-even params (the module docstring's rules)."""
    _same_bits(join_master(_u16(params), remainders), master, "joined master")
    for got, want in zip(moments, master_moments):
        assert got.tobytes() == want.tobytes(), "moments differ from the fp32-master path's"
    want_bits, want_remainders = split_master(master)
    finite = ~np.isnan(master)
    assert np.array_equal(_u16(params), want_bits), "params are not split_master(master)'s"
    assert np.array_equal(remainders[finite], want_remainders[finite]), "remainders are not the master's low halves"
    bits = _u32(master)
    tie_with_even_high = finite & ((bits & 0xFFFF) == 0x8000) & ((bits >> 16) & 1 == 0)
    differ = _u16(params) != _u16(nearest)
    assert np.array_equal(differ, tie_with_even_high), (
        f"params differ from nearest-even at {np.flatnonzero(differ)[:8]}, "
        f"expected exactly at the even-high ties {np.flatnonzero(tie_with_even_high)[:8]}")
    assert np.array_equal(_u16(params)[differ], _u16(nearest)[differ] + 1), "a tie went toward zero"


def _oracle_before(master, grads, moments, grad_scale):
    return (master.copy(), grads.astype(np.float64) / grad_scale, *(m.copy() for m in moments))


# --- remainders --------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", REMAINDER_STORAGES, ids=lambda s: s.short)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_remainders_are_the_fp32_master_path_bit_for_bit(storage, size, options):
    """Several steps (below the threshold and rectified), fresh gradients each: the joined master
    and the moments equal the fp32-master path's bit for bit, the params show it rounded with
    ties away from zero, and the master is within the float64 oracle's fp32 bound
    (tests/oracle_check.py: 16 float32 roundings of each output's error scale, plus one storage
    ulp for 16-bit outputs, so the bfloat16 params get one bfloat16 ulp more)."""
    hyper = {"lr": 1e-2, **{k: v for k, v in options.items() if k != "grad_scale"}}
    grad_scale = options.get("grad_scale", 1.0)
    master, grads, m, v = _fresh(storage, size, seed=size)
    params, remainders = _remainder_state(master)
    ours = [params, None, m.copy(), v.copy()]
    theirs = [master.astype(BF16), None, m.copy(), v.copy()]
    rng = np.random.default_rng(size + 7)
    for step in STEP_SEQUENCE:
        grads = (rng.standard_normal(size) * grad_scale).astype(grads.dtype)
        ours[1] = theirs[1] = grads
        before = _oracle_before(join_master(_u16(params), remainders), grads, ours[2:], grad_scale)
        fused_step(*ours, step=step, param_remainders=remainders, grad_scale=grad_scale, **hyper)
        fused_step(*theirs, step=step, master_params=master, grad_scale=grad_scale, **hyper)
        _assert_remainders_hold(params, remainders, ours[2:], master, theirs[0], theirs[2:])
        joined = join_master(_u16(params), remainders)
        assert_matches_oracle(before, (joined, ours[2], ours[3]), {"step": step, **hyper})
        assert_matches_oracle(before, (params, ours[2], ours[3]), {"step": step, **hyper})


@pytest.mark.parametrize("storage", REMAINDER_STORAGES, ids=lambda s: s.short)
def test_remainders_with_non_finite_values_follow_the_fp32_master_path(storage):
    """Infinite and NaN gradients, infinite masters: the same NaNs and infinities as the
    fp32-master path (params showing a NaN as the quiet NaN with its sign)."""
    master, grads, m, v = _fresh(storage, 4099, seed=3)
    grads[[5, 70, 4098]] = [np.inf, np.nan, -np.inf]
    master[[100, 101, 4097]] = [np.inf, -np.inf, np.nan]
    params, remainders = _remainder_state(master)
    ours, theirs = [params, grads, m.copy(), v.copy()], [master.astype(BF16), grads, m.copy(), v.copy()]
    for step in (3, 9):
        hyper = {"weight_decay": 0.1, "decoupled_weight_decay": True}  # L2 would turn p = inf into a NaN
        fused_step(*ours, step=step, param_remainders=remainders, **hyper)
        fused_step(*theirs, step=step, master_params=master, **hyper)
        _assert_remainders_hold(params, remainders, ours[2:], master, theirs[0], theirs[2:])
    assert np.isnan(master[[5, 70, 4097]]).all() and np.isinf(master[[100, 101]]).all()


@pytest.mark.parametrize("skip", ["found_inf", "check_finite"])
@pytest.mark.parametrize("storage", REMAINDER_STORAGES[:2] + STOCHASTIC_STORAGES[-2:], ids=lambda s: s.short)
def test_a_skipped_step_leaves_every_buffer_untouched(storage, skip):
    master, grads, m, v = _fresh(storage, 2**16 + 4, seed=11)
    grads[2**16 + 1] = np.inf
    params, remainders = _remainder_state(master)
    keep = {"param_remainders": remainders} if storage.remainders else {"stochastic_round_seed": 5}
    every = [params, grads, m, v] + ([remainders] if storage.remainders else [])
    snapshot = [b.tobytes() for b in every]
    flags = {"found_inf": np.array(True)} if skip == "found_inf" else {"check_finite": True}
    fused_step(params, grads, m, v, step=7, **flags, **keep)
    assert [b.tobytes() for b in every] == snapshot


@pytest.mark.parametrize("storage", MULTI_TENSOR_REMAINDERS, ids=lambda s: s.short)
def test_remainders_on_a_layout_and_a_tensor_list_are_the_fp32_master_path(storage):
    """Several groups, padding (align 64, never written), an inactive segment (untouched), and
    the same tensors as a tensor list with per-tensor steps."""
    sizes = (1, 7, 33, 2**16 + 4)
    tensors = [_fresh(storage, n, seed=n) for n in sizes]
    groups = [{"lr": 1e-2}, {"lr": 3e-3, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}]
    layout = FlatLayout([(n,) for n in sizes], groups=[0, 1, 1, 0])
    steps, has_grad = [4, 8, 8, 8], np.array([True, True, False, True])
    # a layout: the remainders' flats beside the master's, padding set to a value a write would change
    masters = layout.pack([t[0] for t in tensors])
    pad = np.ones(layout.size, bool)
    for s in layout.segments:
        pad[s.offset:s.offset + s.size] = False
    masters[pad] = 1.5
    grads, m, v = (layout.pack([t[k] for t in tensors]) for k in (1, 2, 3))
    for buffer in (grads, m, v):
        buffer[pad] = 1.5
    params, remainders = _remainder_state(masters)
    ours, theirs = [params, grads, m.copy(), v.copy()], [masters.astype(BF16), grads, m.copy(), v.copy()]
    untouched = [b.copy() for b in (params, remainders, ours[2], ours[3])]
    for repeat in range(2):
        fused_step_layout(layout, *ours, steps=np.add(steps, repeat), groups=groups, has_grad=has_grad,
                          param_remainders=remainders)
        fused_step_layout(layout, *theirs, steps=np.add(steps, repeat), groups=groups, has_grad=has_grad,
                          master_params=masters)
        _assert_remainders_hold(params, remainders, ours[2:], masters, theirs[0], theirs[2:])
    inactive = layout.segments[2]
    quiet = pad.copy()
    quiet[inactive.offset:inactive.offset + inactive.size] = True
    for now, then in zip((params, remainders, ours[2], ours[3]), untouched):
        assert now[quiet].tobytes() == then[quiet].tobytes(), "padding or an inactive segment was written"
    # a tensor list of the same tensors, group by group
    states = [_remainder_state(t[0]) for t in tensors]
    ours = [[s[0] for s in states], [t[1] for t in tensors], [t[2].copy() for t in tensors],
            [t[3].copy() for t in tensors]]
    masters = [t[0].copy() for t in tensors]
    theirs = [[x.astype(BF16) for x in masters], ours[1], [t[2].copy() for t in tensors],
              [t[3].copy() for t in tensors]]
    for repeat in range(2):
        kwargs = {"steps": np.add(steps, repeat), "groups": groups, "group_index": [0, 1, 1, 0], "has_grad": has_grad}
        fused_step_multi(*ours, param_remainders=[s[1] for s in states], **kwargs)
        fused_step_multi(*theirs, master_params=masters, **kwargs)
    for i, ((params, remainders), master) in enumerate(zip(states, masters)):
        _assert_remainders_hold(params, remainders, (ours[2][i], ours[3][i]), master, theirs[0][i],
                                (theirs[2][i], theirs[3][i]))
    assert join_master(_u16(states[2][0]), states[2][1]).tobytes() == tensors[2][0].tobytes(), "inactive tensor"


def test_a_plan_bound_once_steps_remainders_as_the_one_shot_calls():
    storage = REMAINDER_STORAGES[3]
    master, grads, m, v = _fresh(storage, 1000, seed=2)
    (p1, r1), (p2, r2) = _remainder_state(master), _remainder_state(master)
    ours, theirs = [p1, grads, m.copy(), v.copy()], [p2, grads, m.copy(), v.copy()]
    plan = StepPlan(*ours, param_remainders=r1, lr=1e-2, weight_decay=0.1)
    for step in (1, 2, 3, 10):
        plan.step(step)
        fused_step(*theirs, step=step, param_remainders=r2, lr=1e-2, weight_decay=0.1)
    assert all(a.tobytes() == b.tobytes() for a, b in zip((*ours, r1), (*theirs, r2)))
    assert plan.storage.remainders and plan.storage.short == "bf16_bf16_bf16_rem"


@pytest.mark.parametrize("storage", [REMAINDER_STORAGES[3], STOCHASTIC_STORAGES[3]], ids=lambda s: s.short)
def test_a_tensor_plan_given_gradients_per_step_is_the_one_shot_call(storage):
    """A tensor plan bound without gradients checks and steps each step's, remainders or SR alike."""
    tensors = [_fresh(storage, n, seed=n) for n in (5, 300)]
    runs = []
    for one_shot in (False, True):
        state = [_remainder_state(t[0]) for t in tensors]
        params, remainders = [s[0] for s in state], [s[1] for s in state]
        m, v = [t[2].copy() for t in tensors], [t[3].copy() for t in tensors]
        keep = {"param_remainders": remainders} if storage.remainders else {"stochastic_round_seed": 9}
        if storage.stochastic:
            params = [t[0].astype(BF16) for t in tensors]
        if one_shot:
            fused_step_multi(params, [t[1] for t in tensors], m, v, steps=[3, 3], groups=[{"lr": 1e-2}], **keep)
        else:
            plan = StepPlan(params, None, m, v, lr=1e-2, **keep)
            plan.step(steps=[3, 3], grads=[t[1] for t in tensors])
            with pytest.raises(TypeError, match=r"grads\[1\] has dtype bfloat16 but grads\[0\] has float64"):
                plan.step(steps=[4, 4], grads=[tensors[0][1].astype(np.float64), tensors[1][1]])
        runs.append([x.tobytes() for x in (*params, *m, *v, *(remainders if storage.remainders else ()))])
    assert runs[0] == runs[1]


def _at_byte_offset(values: np.ndarray, offset: int) -> np.ndarray:
    """``values`` copied into a buffer that starts ``offset`` bytes past a 64-byte boundary."""
    raw = np.empty(values.nbytes + 64 + offset, np.uint8)
    start = -raw.__array_interface__["data"][0] % 64 + offset
    view = raw[start:start + values.nbytes].view(values.dtype)
    view[...] = values
    return view


#: Byte offsets of (params, grads, exp_avg, exp_avg_sq, remainders): all alike (word pairs, a peeled
#: head at 2), the remainders alone off (one element at a time), odd addresses.
ALIGNMENTS = [(0, 0, 0, 0, 0), (2, 2, 2, 2, 2), (0, 0, 0, 0, 2), (2, 2, 2, 2, 0), (1, 1, 1, 1, 1), (0, 2, 0, 0, 0)]


@pytest.mark.parametrize("offsets", ALIGNMENTS, ids=str)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 33, 2**16 + 3])
def test_all_bfloat16_remainders_at_any_alignment_are_the_fp32_master_path(offsets, size):
    """All-bfloat16 buffers are stepped two elements a word (remainders two a word too) when
    every view, the remainders' included, starts alike mod 4; otherwise one at a time."""
    storage = next(s for s in REMAINDER_STORAGES if s.grads == s.moments == "bfloat16")
    master, grads, m, v = _fresh(storage, size, seed=size)
    params, remainders = _remainder_state(master)
    placed = [_at_byte_offset(b, o) for b, o in zip((params, grads, m, v, remainders), offsets)]
    theirs = [master.astype(BF16), grads, m.copy(), v.copy()]
    for step in (2, 10):
        fused_step(*placed[:4], step=step, param_remainders=placed[4], lr=1e-2, weight_decay=0.1)
        fused_step(*theirs, step=step, master_params=master, lr=1e-2, weight_decay=0.1)
        _assert_remainders_hold(placed[0], placed[4], placed[2:4], master, theirs[0], theirs[2:])


# --- the bit format: Transformer Engine's -------------------------------------------------------

#: Hand-made fp32 masters and the (bfloat16 bits, int16 remainder) Transformer Engine stores:
#: b = high half + 1 where the low half's top bit is set, r = the low half.
TE_FORMAT = [
    (0x3F808000, 0x3F81, -32768),  # a tie, even high half: away from zero (nearest-even: 0x3F80)
    (0x3F818000, 0x3F82, -32768),  # a tie, odd high half: nearest-even agrees
    (0xBF808000, 0xBF81, -32768),  # negative tie: magnitude up
    (0x3F807FFF, 0x3F80, 0x7FFF),
    (0x3F80FFFF, 0x3F81, -1),
    (0xBF80C000, 0xBF81, -16384),
    (0x3F800000, 0x3F80, 0),
    (0x80000000, 0x8000, 0),  # -0
    (0x00008000, 0x0001, -32768),  # the smallest subnormal's tie
    (0x7F7FFFFF, 0x7F80, -1),  # the largest float shows as infinity and decodes exactly
    (0xFF7FFFFF, 0xFF80, -1),
    (0x7F800000, 0x7F80, 0),
    (0xFF800000, 0xFF80, 0),
]


def test_split_master_is_transformer_engines_format():
    masters = np.array([x for x, _, _ in TE_FORMAT], np.uint32).view(F32)
    bits, remainders = split_master(masters)
    assert [hex(b) for b in bits] == [hex(b) for _, b, _ in TE_FORMAT]
    assert remainders.tolist() == [r for _, _, r in TE_FORMAT]
    assert bits.dtype == np.uint16 and remainders.dtype == np.int16
    assert join_master(bits, remainders).view(np.uint32).tolist() == [x for x, _, _ in TE_FORMAT]
    # NaN: shown as the quiet NaN with its sign (TE's rule would show 0x7F800001 as infinity and
    # 0xFFFF8000 as +0), and decoded as a NaN again
    nans = np.array([0x7F800001, 0xFFFF8000, 0x7FFF8000, 0xFFC00000], np.uint32).view(F32)
    bits, remainders = split_master(nans)
    assert [hex(b) for b in bits] == ["0x7fc0", "0xffc0", "0x7fc0", "0xffc0"]
    assert np.isnan(join_master(bits, remainders)).all()


def test_split_and_join_are_exact_for_every_class_of_float32():
    """join(split(X)) == X for random patterns (subnormals, infinities), ties of both parities
    and the binade edges; b is X to nearest with ties away from zero, and differs from
    ml_dtypes' nearest-even exactly at the ties with an even high half."""
    rng = np.random.default_rng(17)
    words = rng.integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32)
    ties = (words & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    edges = np.concatenate([np.arange(start - 70000, start + 70000, dtype=np.int64) % 2**32
                            for start in (0, 0x00800000, 0x3F800000, 0x7F800000, 0x80000000)]).astype(np.uint32)
    words = np.concatenate([words, ties, edges])
    masters = words.view(F32)
    finite_or_inf = ~np.isnan(masters)
    bits, remainders = split_master(masters)
    assert np.array_equal(_u32(join_master(bits, remainders))[finite_or_inf], words[finite_or_inf])
    high, low = words >> 16, words & 0xFFFF
    away = (high + (low >= 0x8000)).astype(np.uint16)
    assert np.array_equal(bits[finite_or_inf], away[finite_or_inf])
    assert np.array_equal(remainders.view(np.uint16), low.astype(np.uint16))
    with np.errstate(invalid="ignore"):  # ml_dtypes casting the NaNs
        nearest = masters.astype(BF16).view(np.uint16)
    tie_even = finite_or_inf & (low == 0x8000) & (high & 1 == 0)
    assert np.array_equal(bits != nearest, tie_even | (np.isnan(masters) & (bits != nearest)))
    assert np.array_equal(bits[np.isnan(masters)], ((high & 0x8000) | 0x7FC0)[np.isnan(masters)].astype(np.uint16))


def _one_step_bits(masters_u32, step_options, size_pad=0):
    """The kernel's (bfloat16 bits, remainders) after one step of the given masters (params and
    remainders from split_master), with random moments and gradients."""
    masters = np.asarray(masters_u32, np.uint32).view(F32)
    params, remainders = _remainder_state(masters)
    rng = np.random.default_rng(0)
    n = masters.size
    grads, m = np.abs(rng.standard_normal((2, n))).astype(F32)  # a positive update: -0 - 0 * update stays -0
    v = rng.uniform(0.1, 1.0, n).astype(F32)
    fused_step(params, grads, m, v, param_remainders=remainders, **step_options)
    return _u16(params), remainders


def test_the_kernel_stores_transformer_engines_format():
    """lr = 0 keeps each master (p - 0 * update): the kernel's decode and encode must give the
    hand-made bits back; a step that lands on known masters (decoupled decay of +-1.0 by
    1 - 3 * 2**-10 and 1 - 2**-9, no momentum) must store their hand-made split."""
    words = [x for x, _, _ in TE_FORMAT]
    bits, remainders = _one_step_bits(words, {"step": 3, "lr": 0.0})
    assert [hex(b) for b in bits] == [hex(b) for _, b, _ in TE_FORMAT]
    assert remainders.tolist() == [r for _, _, r in TE_FORMAT]
    for decay, positive, negative in ((3 * 2**-10, (0x3F7F, 0x4000), (0xBF7F, 0x4000)),
                                      (2**-9, (0x3F80, -32768), (0xBF80, -32768))):  # 0x3F7F8000: a tie
        params = np.array([1.0, -1.0], BF16)
        remainders = np.zeros(2, np.int16)  # zeros: the master is the params' values
        zeros = np.zeros(2, F32)
        fused_step(params, zeros, zeros.copy(), np.ones(2, F32), step=1, lr=decay, weight_decay=1.0,
                   decoupled_weight_decay=True, param_remainders=remainders)
        assert list(zip(_u16(params).tolist(), remainders.tolist())) == [positive, negative]
    # NaN masters: the quiet NaN with the sign, decoded as a NaN
    bits, remainders = _one_step_bits([0x7F800001, 0xFFFF8000, 0x7FFF8000, 0x3F800000], {"step": 3, "lr": 0.0})
    assert [hex(b) for b in bits] == ["0x7fc0", "0xffc0", "0x7fc0", "0x3f80"]
    assert np.isnan(join_master(bits, remainders)[:3]).all()


def test_lr_zero_keeps_ties_away_from_zero_where_nearest_even_would_not():
    """Every master of a 65537-element buffer is a tie (low half 0x8000), high halves of both
    parities: with lr = 0 the master stays, bit for bit; the params show each tie rounded up in
    magnitude, the nearest-even path's only those with an odd high half."""
    rng = np.random.default_rng(5)
    signs = rng.integers(0, 2, 2**16 + 1, dtype=np.uint32) << 15
    high = rng.integers(0x0001, 0x7F7F, 2**16 + 1, dtype=np.uint32) | signs
    masters = ((high << 16) | 0x8000).astype(np.uint32).view(F32)
    params, remainders = _remainder_state(masters)
    grads, m, v = (np.full(masters.size, x, F32) for x in (0.5, 0.1, 0.2))
    theirs = [masters.astype(BF16), grads, m.copy(), v.copy()]
    kept = masters.copy()
    fused_step(params, grads, m, v, step=8, lr=0.0, param_remainders=remainders)
    fused_step(*theirs, step=8, lr=0.0, master_params=kept)
    assert kept.tobytes() == masters.tobytes()
    _assert_remainders_hold(params, remainders, (m, v), kept, theirs[0], theirs[2:])
    assert np.array_equal(_u16(params), (high + 1).astype(np.uint16))
    assert np.array_equal(_u16(theirs[0]), (high + (high & 1)).astype(np.uint16))


# --- stochastic rounding -----------------------------------------------------------------------


def _sr_reference(params, grads, m, v, step, seed, hyper, grad_scale=1.0, index=None):
    """The fp32-master path's step from the bfloat16 params widened, rounded stochastically with
    the oracle's bits: the expected (params bits, exp_avg, exp_avg_sq)."""
    master = params.astype(F32)
    theirs = [params.copy(), grads, m.copy(), v.copy()]
    fused_step(*theirs, step=step, master_params=master, grad_scale=grad_scale, **hyper)
    index = np.arange(params.size) if index is None else index
    return stochastic_round_bfloat16(master, stochastic_round_bits(seed, step, index)), theirs[2], theirs[3], master


def _sr_buffers(storage, size, seed):
    master, g, m, v = _fresh(storage, size, seed)
    return [master.astype(BF16), g, m, v]


@pytest.mark.parametrize("storage", STOCHASTIC_STORAGES, ids=lambda s: s.short)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("options", OPTIONS[:5], ids=str)
def test_stochastic_rounding_is_the_fp32_step_rounded_with_the_oracles_bits(storage, size, options):
    """Several steps, each from the params the last one rounded: params equal
    stochastic_round_bfloat16(fp32-master path's master, stochastic_round_bits(seed, step, i))
    exactly, the moments equal the fp32-master path's, and the params are within one bfloat16
    ulp (SR's error is under one) plus the fp32 bound of the float64 oracle (checked on the
    sizes without planted non-finite values). A NaN and an infinite gradient plant NaNs, which
    show as the quiet NaN with their sign."""
    hyper = {"lr": 1e-2, **{k: v for k, v in options.items() if k != "grad_scale"}}
    grad_scale = options.get("grad_scale", 1.0)
    ours = _sr_buffers(storage, size, seed=size)
    if size > 33:
        ours[1][[3, size - 2]] = [np.nan, -np.inf]
    seed = 2**63 + 12345
    for step in STEP_SEQUENCE:
        expected, m, v, master = _sr_reference(*ours, step, seed, hyper, grad_scale)
        before = _oracle_before(ours[0].astype(F32), ours[1], ours[2:], grad_scale)
        fused_step(*ours, step=step, stochastic_round_seed=seed, grad_scale=grad_scale, **hyper)
        assert np.array_equal(_u16(ours[0]), expected), np.flatnonzero(_u16(ours[0]) != expected)[:8]
        assert ours[2].tobytes() == m.tobytes() and ours[3].tobytes() == v.tobytes()
        if size <= 33:
            assert_matches_oracle(before, (ours[0], ours[2], ours[3]), {"step": step, **hyper})
    if size > 33:
        nan = np.isnan(ours[0].astype(F32))
        assert nan[3] and nan[size - 2]
        assert np.all(_u16(ours[0])[nan] & 0x7FFF == 0x7FC0)


@pytest.mark.parametrize("offsets", [(0, 0, 0, 0), (2, 2, 2, 2), (1, 1, 1, 1), (0, 2, 0, 0), (2, 0, 2, 2)], ids=str)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 33, 2**16 + 3])
def test_all_bfloat16_stochastic_rounding_at_any_alignment(offsets, size):
    """The word-pair loop (two elements a word, indices 2k and 2k + 1), the peeled head and the
    odd tail, and the one-at-a-time loop, all give the oracle's bits."""
    storage = next(s for s in STOCHASTIC_STORAGES if s.grads == s.moments == "bfloat16")
    ours = [_at_byte_offset(b, o) for b, o in zip(_sr_buffers(storage, size, seed=size), offsets)]
    for step in (2, 10):
        expected, m, v, _ = _sr_reference(*ours, step, 99, {"lr": 1e-2})
        fused_step(*ours, step=step, stochastic_round_seed=99, lr=1e-2)
        assert np.array_equal(_u16(ours[0]), expected)
        assert ours[2].tobytes() == m.tobytes() and ours[3].tobytes() == v.tobytes()


def _sr_step_all_ways(storage, sizes, seed, step, hyper, has_grad=None, align=64):
    """The same tensors stepped as one flat buffer (their concatenation), a padded layout and a
    tensor list: the three params results (flat, per tensor), the layout's flat buffers after and
    before, and the layout."""
    tensors = [_sr_buffers(storage, n, seed=n) for n in sizes]
    flat = [np.concatenate([t[k] for t in tensors]) for k in range(4)]
    layout = FlatLayout([(n,) for n in sizes], align=align)
    packed = [layout.pack([t[k] for t in tensors]) for k in range(4)]
    packed_before = [b.copy() for b in packed]
    listed = [[t[k].copy() for t in tensors] for k in range(4)]
    steps = np.full(len(sizes), step)
    fused_step(*flat, step=step, stochastic_round_seed=seed, **hyper)
    fused_step_layout(layout, *packed, steps=steps, groups=[hyper], has_grad=has_grad, stochastic_round_seed=seed)
    fused_step_multi(*listed, steps=steps, groups=[hyper], has_grad=has_grad, stochastic_round_seed=seed)
    return flat, listed, packed, packed_before, layout


@pytest.mark.parametrize("storage", [STOCHASTIC_STORAGES[0], STOCHASTIC_STORAGES[3]], ids=lambda s: s.short)
def test_stochastic_bits_are_the_same_flat_as_a_layout_or_a_tensor_list(storage):
    """An element's bits follow its global index (padding not counted), never the block it falls
    in: a flat buffer, a padded layout and a tensor list of the same tensors agree bit for bit,
    and padding is never written."""
    sizes = (5, 2**16 + 7, 33, 1, 2**16 - 1)
    hyper = {"lr": 1e-2, "weight_decay": 0.1}
    flat, listed, packed, packed_before, layout = _sr_step_all_ways(storage, sizes, 7, 9, hyper)
    starts = np.cumsum((0,) + sizes)
    for k in (0, 2, 3):
        for i, segment in enumerate(layout.segments):
            part = flat[k][starts[i]:starts[i + 1]]
            assert packed[k][segment.offset:segment.offset + segment.size].tobytes() == part.tobytes()
            assert listed[k][i].tobytes() == part.tobytes()
        written = np.zeros(layout.size, bool)
        for segment in layout.segments:
            written[segment.offset:segment.offset + segment.size] = True
        assert packed[k][~written].tobytes() == packed_before[k][~written].tobytes()
    tensors = [_sr_buffers(storage, n, seed=n) for n in sizes]  # the same inputs again
    expected, _, _, _ = _sr_reference(*(np.concatenate([t[k] for t in tensors]) for k in range(4)), 9, 7, hyper)
    assert np.array_equal(_u16(flat[0]), expected)


def test_inactive_tensors_keep_their_place_in_the_global_index():
    """A segment or tensor without a gradient this step still counts in the index of the ones after it."""
    storage = STOCHASTIC_STORAGES[0]
    sizes = (33, 1000, 70)
    hyper = {"lr": 1e-2}
    flat, listed, packed, packed_before, layout = _sr_step_all_ways(storage, sizes, 3, 4, hyper,
                                                                    has_grad=[True, False, True])
    starts = np.cumsum((0,) + sizes)
    for i in (0, 2):
        part = flat[0][starts[i]:starts[i + 1]]
        segment = layout.segments[i]
        assert packed[0][segment.offset:segment.offset + segment.size].tobytes() == part.tobytes()
        assert listed[0][i].tobytes() == part.tobytes()
    segment = layout.segments[1]
    assert packed[0][segment.offset:segment.offset + segment.size].tobytes() == \
        packed_before[0][segment.offset:segment.offset + segment.size].tobytes()


def test_a_layout_with_steps_per_segment_uses_each_segments_key():
    """Segments at different steps (and groups): each segment's bits are the oracle's of its own
    step at its global index; the moments are the fp32-master layout step's."""
    storage = STOCHASTIC_STORAGES[1]
    sizes, steps = (40, 2**16 + 9, 3), np.array([2, 30, 7])
    groups = [{"lr": 1e-2}, {"lr": 1e-3, "weight_decay": 0.1}]
    layout = FlatLayout([(n,) for n in sizes], groups=[1, 0, 1], align=16)
    tensors = [_sr_buffers(storage, n, seed=n) for n in sizes]
    ours = [layout.pack([t[k] for t in tensors]) for k in range(4)]
    theirs = [b.copy() for b in ours]
    master = ours[0].astype(F32)
    fused_step_layout(layout, *ours, steps=steps, groups=groups, stochastic_round_seed=2**64 - 1)
    fused_step_layout(layout, *theirs, steps=steps, groups=groups, master_params=master)
    first = 0
    for segment, step in zip(layout.segments, steps):
        part = slice(segment.offset, segment.offset + segment.size)
        bits = stochastic_round_bits(2**64 - 1, int(step), np.arange(first, first + segment.size))
        assert np.array_equal(_u16(ours[0][part]), stochastic_round_bfloat16(master[part], bits))
        first += segment.size
    assert ours[2].tobytes() == theirs[2].tobytes() and ours[3].tobytes() == theirs[3].tobytes()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two Numba threads")
def test_stochastic_bits_do_not_depend_on_the_thread_count():
    storage = STOCHASTIC_STORAGES[2]
    results = []
    threads = numba.get_num_threads()
    try:
        for count in (1, 2):
            numba.set_num_threads(count)
            ours = _sr_buffers(storage, 3 * 2**16 + 7, seed=1)
            fused_step(*ours, step=12, stochastic_round_seed=42, lr=1e-2)
            listed = [[b[:70000].copy(), b[70000:].copy()] for b in _sr_buffers(storage, 3 * 2**16 + 7, seed=1)]
            fused_step_multi(*listed, steps=[12, 12], stochastic_round_seed=42, groups=[{"lr": 1e-2}])
            results.append((ours[0].tobytes(), np.concatenate(listed[0]).tobytes()))
    finally:
        numba.set_num_threads(threads)
    assert results[0] == results[1]
    assert results[0][0] == results[0][1]


def test_same_seed_and_step_reproduce_and_others_differ():
    storage = STOCHASTIC_STORAGES[0]
    hyper = {"lr": 0.1}  # steps that move the params by several bfloat16 ulps: low halves spread
    count = 2**15

    def rounded(seed, step):
        ours = _sr_buffers(storage, count, seed=8)
        fused_step(*ours, step=step, stochastic_round_seed=seed, **hyper)
        return _u16(ours[0]).copy()

    base = rounded(1, 7)
    assert np.array_equal(base, rounded(1, 7))
    plan_buffers = _sr_buffers(storage, count, seed=8)
    StepPlan(*plan_buffers, stochastic_round_seed=1, **hyper).step(7)
    assert np.array_equal(base, _u16(plan_buffers[0]))
    # independent roundings of one fp32 value y differ with probability 2 f (1 - f), f = (y's low half) / 2**16
    for seed, step in ((2, 7), (1, 8), (2**32 + 1, 7), (1 + 2**32, 7 + 2**32)):
        _, _, _, master = _sr_reference(*_sr_buffers(storage, count, seed=8), step, seed, hyper)
        f = (_u32(master) & 0xFFFF) / 2**16
        p = 2 * f * (1 - f)
        assert p.mean() > 0.05  # the values are spread enough for the bits to show
        other = rounded(seed, step)
        assert not np.array_equal(other, base)
        if step == 7:  # the same fp32 values, other bits
            assert abs(np.mean(other != base) - p.mean()) < SIGMAS * np.sqrt((p * (1 - p)).sum()) / count


def test_round_keys_fill_the_scalar_table():
    """step_scalars' key columns are rounding.round_key's (int32 bit patterns), zeros without a seed."""
    common = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
              "decoupled_weight_decay": False, "maximize": False}
    for seed, step in ((0, 1), (2**64 - 1, 10**7), (12345, 2**53)):
        scalars = step_scalars(step=step, round_seed=seed, **common)
        key = splitmix64(seed ^ splitmix64(step))
        assert (scalars.round_key_lo, scalars.round_key_hi) == round_key(seed, step)
        assert [x % 2**32 for x in round_key(seed, step)] == [key & 0xFFFFFFFF, key >> 32]
        assert all(-(2**31) <= x < 2**31 for x in round_key(seed, step))
    assert step_scalars(step=3, **common)[-2:] == (0, 0)


def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = x * 0x7FEB352D % 2**32
    x ^= x >> 15
    x = x * 0x846CA68B % 2**32
    return x ^ (x >> 16)


def test_the_oracles_bits_are_the_documented_hash():
    """rounding's docstring, in plain Python integers: u = lowbias32(lowbias32(i_lo ^ key_lo) ^
    i_hi ^ key_hi) >> 16, key = splitmix64(seed ^ splitmix64(step)); indices past 2**32 included."""
    indices = [0, 1, 2, 65535, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**63 - 1]
    for seed, step in ((0, 1), (7, 9), (2**64 - 1, 2**53)):
        key = splitmix64(seed ^ splitmix64(step))
        want = [_lowbias32(_lowbias32((i & 0xFFFFFFFF) ^ (key & 0xFFFFFFFF)) ^ (i >> 32) ^ (key >> 32)) >> 16
                for i in indices]
        assert stochastic_round_bits(seed, step, np.array(indices, np.uint64)).tolist() == want


# --- statistics --------------------------------------------------------------------------------


def _binomial_bound(count: int, p: float) -> float:
    return SIGMAS * np.sqrt(p * (1 - p) / count)


def test_the_oracles_bits_are_uniform_and_blind_to_index_parity():
    """2**20 draws (one seed and step, consecutive indices) and 2**14 draws (one index, consecutive
    seeds): values in [0, 2**16); a chi-square over 256 bins of the high and of the low byte below
    df + 6 sqrt(2 df); each bit set half the time, and equal to the index's parity half the time,
    and the mean over even indices that over odd ones, within 5 sigma."""
    count = 2**20
    index = np.arange(count, dtype=np.uint64)
    for bits, n, parity in ((stochastic_round_bits(12345, 7, index), count, index & 1),
                            (np.array([stochastic_round_bits(seed, 3, np.array([5]))[0] for seed in range(2**14)]),
                             2**14, np.arange(2**14) & 1)):
        assert bits.dtype == np.uint32 and bits.max() < 2**16
        df = 255
        for byte in (bits >> 8, bits & 0xFF):
            observed = np.bincount(byte.astype(np.int64), minlength=256)
            chi2 = float(((observed - n / 256) ** 2 / (n / 256)).sum())
            assert chi2 < df + 6 * np.sqrt(2 * df), chi2
        mean_sigma = 2**16 / np.sqrt(12 * n)
        assert abs(bits.mean() - (2**16 - 1) / 2) < SIGMAS * mean_sigma
        for bit in range(16):
            ones = (bits >> bit) & 1
            assert abs(ones.mean() - 0.5) < _binomial_bound(n, 0.5), bit
            assert abs((ones == parity).mean() - 0.5) < _binomial_bound(n, 0.5), bit
        even, odd = bits[parity == 0], bits[parity == 1]
        assert abs(even.mean() - odd.mean()) < SIGMAS * mean_sigma * np.sqrt(2) * np.sqrt(2)


@pytest.mark.parametrize("low,up", [(0x0000, 0.0), (0x4000, 0.25), (0x8000, 0.5), (0xC000, 0.75),
                                    (0xFFFF, 1 - 2**-16), (0x0001, 2**-16)])
def test_stochastic_rounding_rounds_up_with_probability_low_half_over_2_16(low, up):
    """One value per sign, 2**17 draws each: the magnitude rounds up with probability low / 2**16
    (5-sigma binomial bound; no midpoint rule: 0x8000 is a coin toss, 0x0000 never moves) and
    the mean of the rounded values is the value (unbiased)."""
    count = 2**17
    bits = stochastic_round_bits(2024, 11, np.arange(count))
    for sign in (0, 0x80000000):
        word = 0x3F810000 | low | sign
        value = np.full(count, word, np.uint32).view(F32)
        rounded = stochastic_round_bfloat16(value, bits)
        assert set(np.unique(rounded).tolist()) <= {(word >> 16), (word >> 16) + 1}
        fraction = np.mean(rounded == (word >> 16) + 1)
        assert abs(fraction - up) <= _binomial_bound(count, up) + 1e-12, fraction
        ulp = 2.0**-7
        mean = rounded.astype(np.uint32) << 16
        assert abs(mean.view(F32).astype(np.float64).mean() - float(value[0])) <= \
            _binomial_bound(count, up) * ulp + 1e-12


def test_stochastic_rounding_is_unbiased_over_random_values():
    """2**18 random values across binades: the mean of (SR(x) - x) / ulp(x) is 0 within 5 sigma
    (each term's variance is at most 1/4); infinities stay, the largest float overflows to
    infinity unless u is 0, NaN shows as the quiet NaN with its sign."""
    rng = np.random.default_rng(3)
    count = 2**18
    words = (rng.integers(0x3A000000, 0x45000000, count, dtype=np.uint64).astype(np.uint32)
             | (rng.integers(0, 2, count, dtype=np.uint32) << 31))
    values = words.view(F32)
    bits = stochastic_round_bits(77, 5, np.arange(count))
    rounded = (stochastic_round_bfloat16(values, bits).astype(np.uint32) << 16).view(F32)
    ulp = ((words & np.uint32(0x7F800000)) | np.uint32(0x00010000)).view(F32).astype(np.float64) - \
        (words & np.uint32(0x7F800000)).view(F32).astype(np.float64)
    error = (rounded.astype(np.float64) - values.astype(np.float64)) / ulp
    assert np.all(np.abs(error) < 1)
    assert abs(error.mean()) < SIGMAS * 0.5 / np.sqrt(count)
    specials = np.array([0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7FFFFF, 0x7FA00001, 0xFFC00000], np.uint32).view(F32)
    out = stochastic_round_bfloat16(specials, np.array([65535, 65535, 0, 1, 3, 3], np.uint32))
    assert [hex(x) for x in out] == ["0x7f80", "0xff80", "0x7f7f", "0x7f80", "0x7fc0", "0xffc0"]


def test_the_kernel_rounds_up_a_quarter_of_the_time():
    """2**17 elements of +-1.0, one step of pure decoupled decay by 1 - 3 * 2**-10 (no gradient,
    no momentum): each fp32 result is +-0x3F7F4000 (low half 0x4000), and the kernel's params
    are +-1.0 in a quarter of them (5-sigma binomial bound), +-(1 - 2**-8) in the rest."""
    count = 2**17
    params = np.where(np.arange(count) % 2 == 0, 1.0, -1.0).astype(BF16)
    zeros = np.zeros(count, F32)
    fused_step(params, zeros, zeros.copy(), np.ones(count, F32), step=1, lr=3 * 2**-10, weight_decay=1.0,
               decoupled_weight_decay=True, stochastic_round_seed=6)
    magnitude = _u16(params) & 0x7FFF
    assert set(np.unique(magnitude).tolist()) == {0x3F7F, 0x3F80}
    assert np.array_equal(_u16(params) >> 15, np.arange(count) % 2)
    for half in (magnitude[0::2], magnitude[1::2]):
        assert abs(np.mean(half == 0x3F80) - 0.25) < _binomial_bound(half.size, 0.25)
    expected = stochastic_round_bfloat16(np.full(count, 0x3F7F4000, np.uint32).view(F32) * np.where(
        np.arange(count) % 2 == 0, 1, -1).astype(F32), stochastic_round_bits(6, 1, np.arange(count)))
    assert np.array_equal(_u16(params), expected)


# --- properties --------------------------------------------------------------------------------

property_options = st.fixed_dictionaries({}, optional={
    "lr": st.sampled_from([0.0, 1e-3, 0.1]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "decoupled_weight_decay": st.booleans(),
    "maximize": st.booleans(),
    "flavour": st.sampled_from(["torch", "authors", "optax", "keras"]),
})


@settings(max_examples=40)
@given(storage=st.sampled_from(REMAINDER_STORAGES), size=st.one_of(st.integers(0, 300), st.just(2**16 + 1)),
       steps=st.lists(st.integers(1, 10**4), min_size=1, max_size=3), hyper=property_options,
       seed=st.integers(0, 2**32 - 1))
def test_any_remainder_step_is_the_fp32_master_path(storage, size, steps, hyper, seed):
    master, grads, m, v = _fresh(storage, size, seed)
    params, remainders = _remainder_state(master)
    ours, theirs = [params, grads, m.copy(), v.copy()], [master.astype(BF16), grads, m.copy(), v.copy()]
    for step in steps:
        fused_step(*ours, step=step, param_remainders=remainders, **hyper)
        fused_step(*theirs, step=step, master_params=master, **hyper)
    _assert_remainders_hold(params, remainders, ours[2:], master, theirs[0], theirs[2:])


@settings(max_examples=40)
@given(storage=st.sampled_from(STOCHASTIC_STORAGES), size=st.one_of(st.integers(0, 300), st.just(2**16 + 1)),
       step=st.integers(1, 10**7), hyper=property_options, seed=st.integers(0, 2**64 - 1),
       data_seed=st.integers(0, 2**32 - 1))
def test_any_stochastic_step_is_the_oracle_of_the_fp32_master_path(storage, size, step, hyper, seed, data_seed):
    ours = _sr_buffers(storage, size, data_seed)
    expected, m, v, _ = _sr_reference(*ours, step, seed, hyper)
    fused_step(*ours, step=step, stochastic_round_seed=seed, **hyper)
    assert np.array_equal(_u16(ours[0]), expected)
    assert ours[2].tobytes() == m.tobytes() and ours[3].tobytes() == v.tobytes()


# --- bad input: a clear error, nothing written ---------------------------------------------------

N = 33


def _bad_buffers(params_dtype=BF16):
    master, g, m, v = _fresh(REMAINDER_STORAGES[0], N, seed=4)
    return [master.astype(params_dtype), g, m, v]


def _assert_rejected(buffers, error, match, call=fused_step, **kwargs):
    arrays = [b for b in buffers if isinstance(b, np.ndarray)]
    arrays += [x for value in kwargs.values() for x in (value if isinstance(value, list) else [value])
               if isinstance(x, np.ndarray)]
    snapshot = [np.array(a, copy=True) for a in arrays]
    with pytest.raises(error, match=match):
        if call is fused_step:
            fused_step(*buffers, **{"step": 10, **kwargs})
        else:
            call(*buffers, **kwargs)
    for before, now in zip(snapshot, arrays):
        assert before.tobytes() == now.tobytes(), "a rejected call wrote to a buffer"


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_remainders_only_beside_bfloat16_params(dtype):
    _assert_rejected(_bad_buffers(dtype), TypeError,
                     f"param_remainders is for bfloat16 params, but params is {np.dtype(dtype).name}",
                     param_remainders=np.zeros(N, np.int16))


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.float16, np.float32, np.dtype(">i2")], ids=str)
def test_remainders_must_be_int16(dtype):
    name = np.dtype(dtype).name + ("" if np.dtype(dtype).isnative else r" \(non-native byte order\)")
    _assert_rejected(_bad_buffers(), TypeError, f"param_remainders must be int16 .*, got {name}",
                     param_remainders=np.zeros(N, dtype))


def test_remainder_buffers_are_checked_like_the_others():
    buffers = _bad_buffers()
    _assert_rejected(buffers, ValueError, r"param_remainders has shape \(34,\) but params has \(33,\)",
                     param_remainders=np.zeros(N + 1, np.int16))
    _assert_rejected(buffers, ValueError, r"param_remainders has shape \(3, 11\)",
                     param_remainders=np.zeros((3, 11), np.int16))
    read_only = np.zeros(N, np.int16)
    read_only.flags.writeable = False
    _assert_rejected(buffers, ValueError, "param_remainders is read-only", param_remainders=read_only)
    _assert_rejected(buffers, ValueError, "param_remainders must be C-contiguous",
                     param_remainders=np.zeros(2 * N, np.int16)[::2])
    _assert_rejected(buffers, ValueError, "params and param_remainders share memory",
                     param_remainders=buffers[0].view(np.int16))
    _assert_rejected(buffers, ValueError, "exp_avg and param_remainders share memory",
                     param_remainders=buffers[2].view(np.int16)[:N])


def test_a_master_and_remainders_together_are_refused():
    _assert_rejected(_bad_buffers(), TypeError, "pass master_params or param_remainders, not both",
                     param_remainders=np.zeros(N, np.int16), master_params=np.zeros(N, F32))


def test_remainders_on_tensor_lists_and_layouts_are_checked_per_tensor():
    a, b = _bad_buffers(), [x.copy() for x in _bad_buffers()]
    lists = [[x, y] for x, y in zip(a, b)]
    _assert_rejected(lists, TypeError, r"param_remainders\[1\] has dtype int32 but param_remainders\[0\] has int16",
                     call=fused_step_multi, steps=[2, 2], param_remainders=[np.zeros(N, np.int16),
                                                                            np.zeros(N, np.int32)])
    _assert_rejected(lists, ValueError, "param_remainders has 1 tensors but params has 2", call=fused_step_multi,
                     steps=[2, 2], param_remainders=[np.zeros(N, np.int16)])
    _assert_rejected(lists, ValueError, r"params\[0\] and param_remainders\[1\] share memory",
                     call=fused_step_multi, steps=[2, 2], param_remainders=[np.zeros(N, np.int16),
                                                                            a[0].view(np.int16)])
    layout = FlatLayout([(10,), (20,)])
    flats = [layout.pack([x[:10], x[10:30]]) for x in a]
    _assert_rejected([layout, *flats], ValueError, "param_remainders has shape", call=fused_step_layout,
                     steps=[2, 2], param_remainders=np.zeros(layout.size - 1, np.int16))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_stochastic_rounding_only_for_bfloat16_params(dtype):
    _assert_rejected(_bad_buffers(dtype), TypeError,
                     f"stochastic rounding is for bfloat16 params, but params is {np.dtype(dtype).name}",
                     stochastic_round_seed=1)


def test_stochastic_rounding_without_a_master_or_remainders():
    buffers = _bad_buffers()
    _assert_rejected(buffers, TypeError, "stochastic rounding replaces master_params: pass one of them",
                     stochastic_round_seed=1, master_params=buffers[0].astype(F32))
    _assert_rejected(buffers, TypeError, "stochastic rounding and param_remainders exclude each other",
                     stochastic_round_seed=1, param_remainders=np.zeros(N, np.int16))
    # the same buffers checked (and kept) without stochastic rounding are checked again with it
    master = buffers[0].astype(F32)
    fused_step(*buffers, step=1, master_params=master)
    _assert_rejected(buffers, TypeError, "stochastic rounding replaces master_params",
                     stochastic_round_seed=1, master_params=master)


@pytest.mark.parametrize("seed,error", [(1.5, TypeError), (True, TypeError), ("3", TypeError),
                                        (np.float64(3.0), TypeError), (-1, ValueError), (2**64, ValueError)],
                         ids=repr)
def test_bad_seeds(seed, error):
    _assert_rejected(_bad_buffers(), error, r"stochastic_round_seed must be an int in \[0, 2\*\*64\)",
                     stochastic_round_seed=seed)
    with pytest.raises(error):
        check_seed(seed)


@pytest.mark.parametrize("seed", [0, 2**64 - 1, np.int64(5), np.uint64(2**64 - 1)], ids=repr)
def test_integer_seeds_of_any_integer_type(seed):
    assert isinstance(check_seed(seed), int) and check_seed(seed) == int(seed)
    ours, theirs = _bad_buffers(), _bad_buffers()
    fused_step(*ours, step=4, stochastic_round_seed=seed)
    fused_step(*theirs, step=4, stochastic_round_seed=int(seed))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ours, theirs))
    assert isinstance(seed, numbers.Integral)


def test_stochastic_rounding_needs_a_host_int_step():
    """A step that is not an int (a 0-d array: a device step on CUDA) is refused before any
    write, as without stochastic rounding on the CPU (the CUDA backend, which takes device steps,
    refuses them with stochastic rounding: its key is hashed from the step on the host)."""
    _assert_rejected(_bad_buffers(), TypeError, "step must be an int",
                     stochastic_round_seed=1, step=np.array(3))
