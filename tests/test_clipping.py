"""Gradient clipping by the global norm, fused into the step, on the Numba CPU path (issue 19).

The rules are :mod:`fastradam.clipping`'s; the oracle is :mod:`fastradam.reference`
(:func:`reference_grad_norm`, :func:`reference_clip_coefficient`, :func:`reference_step`): torch's
``GradScaler.unscale_`` + ``clip_grad_norm_`` + ``RAdam.step``, in float64.

The norm's tolerance
--------------------
The pre-pass accumulates ``|g|^p`` in float64 (exact conversions from every storage format; ``g*g``
of a float32/16-bit value is exact in float64, ``|g|^p`` otherwise one ``pow`` of at most an ulp or
so) and the oracle does too. Every term is >= 0, so a sum's relative error is at most ``u`` (2^-53)
times the longest chain of additions a term goes through: in the kernel ``BLOCK / LANES`` (4096)
additions in its lane, the ``LANES`` lanes, then one per block; in NumPy's pairwise sum at most
about ``16 + log2(n)``. The root ``S^(1/p)`` scales a relative error by ``1/p``; the root itself and
the division by ``grad_scale`` (the kernel multiplies by ``1/grad_scale``, the oracle divides each
element) add a few roundings. :func:`norm_rtol` states that bound: about 2e-13 for ``p = 2`` at
140001 elements, 1e-12 for ``p = 0.5``; the inf norm (a max: exact) only the scaling's roundings.
A float32 accumulation would be off by ~1e-7 or more at these sizes, far outside it.

The step's tolerance is tests/oracle_check.py's: the clipped step is the oracle's step fed torch's
clipped gradient ``g * coefficient / grad_scale``; the kernel's gradient factor
``inv_grad_scale * coefficient`` is rounded once to the math dtype, one more rounding of the
gradient, well inside that bound's 16. The coefficient is the one of the norm the step returns
(checked against the oracle's norm first): the step must clip by the norm it reports.
"""

from __future__ import annotations

import math

import ml_dtypes
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastradam import FlatLayout, StepPlan, fused_step, fused_step_layout, fused_step_multi
from fastradam.backends.numba.kernels import BLOCK
from fastradam.clipping import LANES, combine_norms
from fastradam.reference import (join_master, reference_clip_coefficient, reference_grad_norm, reference_step,
                                 split_master)
from fastradam.storage import SUPPORTED, Storage
from tests.cases import numpy_dtypes
from tests.oracle_check import FLOAT64_ROUNDOFF, assert_matches_oracle

BF16, F16, F32, F64 = (np.dtype(d) for d in (ml_dtypes.bfloat16, np.float16, np.float32, np.float64))
INF = math.inf
#: Sizes that hit the scalar case, the vector tail, one partial block and several 65536-element blocks.
SIZES = (1, 17, 1000, 65537, 140001)
NORM_TYPES = (2.0, 1.0, INF, 3.0, 0.5)
#: A representative subset of SUPPORTED: every grads format, the master, remainders and stochastic
#: rounding once each, the all-bfloat16 word loop (each storage is one more Numba compile cold).
STEP_STORAGES = (
    Storage("float32", "float32", "float32"),
    Storage("float64", "float64", "float64"),
    Storage("bfloat16", "bfloat16", "float32", master=True),
    Storage("bfloat16", "bfloat16", "bfloat16"),
    Storage("float16", "float16", "float32"),
    Storage("float32", "bfloat16", "bfloat16"),
    Storage("bfloat16", "bfloat16", "float32", remainders=True),
    Storage("bfloat16", "float16", "float32", stochastic=True),
)
assert set(STEP_STORAGES) <= set(SUPPORTED)
#: The storage the norm tests step each grads format with (all in STEP_STORAGES).
GRAD_STORAGE = {"float32": STEP_STORAGES[0], "float64": STEP_STORAGES[1], "bfloat16": STEP_STORAGES[3],
                "float16": STEP_STORAGES[4]}
F32_STORAGE, MASTER_STORAGE, BF16_STORAGE = STEP_STORAGES[0], STEP_STORAGES[2], STEP_STORAGES[3]
SEED = 7  # stochastic rounding's


def _short(storage: Storage) -> str:
    return storage.short


# --- tolerances ----------------------------------------------------------------------------------


def norm_rtol(size: int, norm_type: float) -> float:
    """The relative bound of the returned norm against the oracle's (the module docstring)."""
    if norm_type == INF:
        return 4 * FLOAT64_ROUNDOFF  # a max is exact; 1/grad_scale and the product vs one division
    blocks = -(-size // BLOCK)
    kernel_chain = min(size, BLOCK) / LANES + LANES + blocks
    numpy_chain = 16 + math.log2(max(size, 1))
    terms = 2 + 2  # |g|^p on each side
    return ((kernel_chain + numpy_chain + terms) / norm_type + 8) * FLOAT64_ROUNDOFF


def assert_norm_close(got, want: float, size: int, norm_type: float) -> None:
    assert isinstance(got, float), f"the norm is a {type(got).__name__}, not a float"
    rtol = norm_rtol(size, norm_type)
    assert abs(got - want) <= rtol * want, (f"norm {got!r} vs the oracle's {want!r}: relative error "
                                            f"{abs(got - want) / want:.3g} > {rtol:.3g} (p={norm_type}, n={size})")


def _bits(value: float) -> str:
    return float(value).hex()


# --- buffers -------------------------------------------------------------------------------------


def _u16(array: np.ndarray) -> np.ndarray:
    return array.view(np.uint16)


class State:
    """A step's buffers in one storage: fresh random values (never zeros), gradients ``grad_scale``
    times a normal spread over three decades (small enough for float16 at the scales used)."""

    def __init__(self, storage: Storage, size: int, seed: int, grad_scale: float = 1.0, shape=None):
        rng = np.random.default_rng(seed)
        p = rng.standard_normal(size)
        g = rng.standard_normal(size) * 10.0 ** rng.uniform(-3, 0, size) * grad_scale
        m = rng.standard_normal(size) * 0.1
        v = rng.uniform(1e-3, 1.0, size) ** 2
        params, grads, moments, _ = numpy_dtypes(storage)
        shape = (size,) if shape is None else shape
        self.storage = storage
        self.params = p.astype(params).reshape(shape)
        self.grads = g.astype(grads).reshape(shape)
        self.exp_avg, self.exp_avg_sq = m.astype(moments).reshape(shape), v.astype(moments).reshape(shape)
        self.master = self.remainders = None
        if storage.master:
            self.master = p.astype(F32).reshape(shape)
            self.params = self.master.astype(params)
        elif storage.remainders:
            bits, remainders = split_master(p.astype(F32))
            self.params, self.remainders = bits.view(BF16).reshape(shape).copy(), remainders.reshape(shape).copy()

    @property
    def keeper(self) -> dict:
        """fused_step's keyword for how the params keep their fp32 values."""
        if self.master is not None:
            return {"master_params": self.master}
        if self.remainders is not None:
            return {"param_remainders": self.remainders}
        return {"stochastic_round_seed": SEED} if self.storage.stochastic else {}

    def buffers(self) -> list[np.ndarray]:
        return [self.params, self.grads, self.exp_avg, self.exp_avg_sq]

    def every(self) -> list[np.ndarray]:
        return [b for b in (*self.buffers(), self.master, self.remainders) if b is not None]

    def snapshot(self) -> list[bytes]:
        return [b.tobytes() for b in self.every()]

    def kept(self) -> np.ndarray:
        """The params' values as the step keeps them: the master, the joined remainders, or the params."""
        if self.master is not None:
            return self.master
        if self.remainders is not None:
            return join_master(_u16(self.params).reshape(-1), self.remainders.reshape(-1))
        return self.params

    def copy(self) -> State:
        twin = object.__new__(State)
        twin.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()})
        return twin


def _flat64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def assert_stepped_as_oracle(before: State, after: State, coefficient: float, grad_scale: float, hyper: dict,
                             part=slice(None)) -> None:
    """``after`` is the oracle's step from ``before`` fed torch's clipped gradient
    ``g * coefficient / grad_scale`` (elements ``part``): NaN exactly where the oracle has NaN, the
    oracle's bound (tests/oracle_check.py) elsewhere; a master's 16-bit copy is the master rounded, and
    remainders are the master's low halves."""
    with np.errstate(invalid="ignore", over="ignore"):
        g = _flat64(before.grads)[part] * coefficient / grad_scale
        old = (_flat64(before.kept())[part], g, _flat64(before.exp_avg)[part], _flat64(before.exp_avg_sq)[part])
        new = tuple(np.asarray(x).reshape(-1)[part] for x in (after.kept(), after.exp_avg, after.exp_avg_sq))
        want = reference_step(*old, **hyper)
    nan = np.zeros(g.size, dtype=bool)
    for name, got, w in zip(("params", "exp_avg", "exp_avg_sq"), new, want):
        got_nan, want_nan = np.isnan(_flat64(got)), np.isnan(w)
        assert np.array_equal(got_nan, want_nan), (f"{name}: NaN at {np.flatnonzero(got_nan)[:6]}, the oracle's "
                                                   f"at {np.flatnonzero(want_nan)[:6]}")
        nan |= want_nan
    keep = ~nan
    if keep.any():
        # the oracle's dtype rule: compare the stored outputs as they are (16-bit ones get a storage ulp)
        assert_matches_oracle(tuple(x[keep] for x in old), tuple(x[keep] for x in new), hyper)
    params = np.asarray(after.params).reshape(-1)[part]
    if after.master is not None:
        master = after.master.reshape(-1)[part]
        with np.errstate(invalid="ignore"):
            assert params.tobytes() == master.astype(params.dtype).tobytes(), "params are not the master rounded"
    if after.remainders is not None:
        bits, _ = split_master(np.asarray(after.kept()).reshape(-1)[part])
        assert np.array_equal(_u16(params), bits), "params are not the joined master's high halves"


# --- the returned norm ---------------------------------------------------------------------------


@pytest.mark.parametrize("grads", sorted(GRAD_STORAGE))
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("grad_scale", [1.0, 1024.0, 3000.0])
def test_the_returned_norm_is_the_oracle_norm_of_the_unscaled_gradients(grads, norm_type, size, grad_scale):
    """fused_step's returned norm and the norm-only pre-pass (StepPlan.grad_norm) against
    reference_grad_norm, every grads format, within norm_rtol (float64 accumulation)."""
    state = State(GRAD_STORAGE[grads], size, seed=size + int(grad_scale), grad_scale=grad_scale)
    want = reference_grad_norm([state.grads], norm_type, grad_scale)
    only = StepPlan(*state.buffers()).grad_norm(norm_type, grad_scale=grad_scale)
    got = fused_step(*state.buffers(), step=5, grad_scale=grad_scale, max_grad_norm=1.0, norm_type=norm_type)
    assert_norm_close(got, want, size, norm_type)
    assert _bits(only) == _bits(got), "the norm-only pre-pass and the step's differ"
    if norm_type == INF and grad_scale in (1.0, 1024.0):  # a max, scaled by a power of two: exact
        assert got == want


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
@pytest.mark.parametrize("grad_scale", [1.0, 3000.0])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=str)
def test_the_norm_sums_in_the_documented_order_bit_for_bit(norm_type, grad_scale, dtype):
    """fastradam.clipping's order, restated here: each BLOCK-element tile of each tensor in LANES
    float64 lanes (element i in lane i % LANES, each lane in element order), the lanes added in lane
    order, the tiles in order, then sqrt and the multiplication by 1/grad_scale. The flat buffer,
    a layout of odd segments (an inactive one) and a tensor list give exactly that float."""
    rng = np.random.default_rng(3)
    sizes = (3 * BLOCK + 33, 17, BLOCK + 1, 1000)
    tensors = [(rng.standard_normal(n) * grad_scale).astype(dtype) for n in sizes]
    storage = {F32: F32_STORAGE, F64: STEP_STORAGES[1], BF16: BF16_STORAGE}[dtype]

    def documented(active):
        total = 0.0
        for grads in active:
            g = grads.astype(np.float64)
            for start in range(0, g.size, BLOCK):
                block = g[start:start + BLOCK]
                terms = block * block if norm_type == 2.0 else np.abs(block)
                rows = np.concatenate([terms, np.zeros(-terms.size % LANES)]).reshape(-1, LANES)
                lanes = np.zeros(LANES)
                for row in rows:  # each lane in element order (the zeros padding the last row add nothing)
                    lanes += row
                partial = 0.0
                for lane in lanes.tolist():
                    partial += lane
                total += partial
        root = math.sqrt(total) if norm_type == 2.0 else total
        return root * (1.0 / grad_scale)

    flat = tensors[0]
    state = State(storage, flat.size, seed=1)
    assert _bits(StepPlan(state.params, flat, state.exp_avg, state.exp_avg_sq).grad_norm(
        norm_type, grad_scale=grad_scale)) == _bits(documented([flat]))
    layout = FlatLayout([(n,) for n in sizes], align=64)
    flats = [layout.pack([State(storage, n, seed=n).buffers()[k] for n in sizes]) for k in (0, 2, 3)]
    grads = layout.pack(tensors)
    has_grad = np.array([True, True, False, True])
    got = StepPlan(flats[0], grads, flats[1], flats[2], layout=layout).grad_norm(norm_type, has_grad=has_grad,
                                                                                  grad_scale=grad_scale)
    assert _bits(got) == _bits(documented([t for t, a in zip(tensors, has_grad) if a]))
    states = [State(storage, n, seed=n) for n in sizes]
    plan = StepPlan([s.params for s in states], tensors, [s.exp_avg for s in states], [s.exp_avg_sq for s in states])
    assert _bits(plan.grad_norm(norm_type, grad_scale=grad_scale)) == _bits(documented(tensors))


# --- the clipped step, flat buffers --------------------------------------------------------------

#: (size, options, norm type, grad scale): each size with its own options, both sides of the threshold.
FLAT_CASES = [
    (1, {"step": 3}, 2.0, 1.0),
    (17, {"step": 10, "weight_decay": 0.1}, 1.0, 1024.0),
    (1000, {"step": 40, "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True}, INF, 3000.0),
    (65537, {"step": 7, "flavour": "authors", "maximize": True}, 3.0, 1.0),
    (140001, {"step": 12, "flavour": "optax", "eps_root": 1e-6, "weight_decay": 0.05}, 0.5, 512.0),
]


@pytest.mark.parametrize("storage", STEP_STORAGES, ids=_short)
@pytest.mark.parametrize("size,options,norm_type,grad_scale", FLAT_CASES, ids=lambda x: repr(x))
@pytest.mark.parametrize("clips", [True, False], ids=["clips", "within"])
def test_flat_step_clips_as_torch_then_steps_as_the_oracle(storage, size, options, norm_type, grad_scale, clips):
    """max_norm below the norm: the oracle's step of the clipped gradient; above it (coefficient 1):
    bit for bit the unclipped step. Gradients are never written."""
    state = State(storage, size, seed=size, grad_scale=grad_scale)
    hyper = {"lr": 1e-2, **options}
    norm = reference_grad_norm([state.grads], norm_type, grad_scale)
    max_norm = norm * (0.25 if clips else 4.0)
    before = state.copy()
    got = fused_step(*state.buffers(), **state.keeper, **hyper, grad_scale=grad_scale, max_grad_norm=max_norm,
                     norm_type=norm_type)
    assert_norm_close(got, norm, size, norm_type)
    coefficient = reference_clip_coefficient(got, max_norm)
    assert (coefficient < 1.0) == clips
    assert_stepped_as_oracle(before, state, coefficient, grad_scale, hyper)
    assert state.grads.tobytes() == before.grads.tobytes(), "the gradients were written"
    if not clips:
        plain = before.copy()
        fused_step(*plain.buffers(), **plain.keeper, **hyper, grad_scale=grad_scale)
        assert state.snapshot() == plain.snapshot(), "a coefficient of 1 changed the step"


@pytest.mark.parametrize("storage", [F32_STORAGE, STEP_STORAGES[1], BF16_STORAGE], ids=_short)
def test_an_infinite_max_norm_clips_nothing_but_returns_the_norm(storage):
    state = State(storage, 70001, seed=4, grad_scale=8.0)
    plain = state.copy()
    got = fused_step(*state.buffers(), step=9, grad_scale=8.0, max_grad_norm=INF, weight_decay=0.1)
    fused_step(*plain.buffers(), step=9, grad_scale=8.0, weight_decay=0.1)
    assert state.snapshot() == plain.snapshot()
    assert_norm_close(got, reference_grad_norm([state.grads], 2.0, 8.0), 70001, 2.0)


def test_a_plan_steps_clipped_as_the_one_shot_call_and_clips_by_each_steps_norm():
    """A flat plan bound once, fresh gradients written into its grads buffer each step: every step's
    norm is that step's, and the buffers follow the one-shot calls bit for bit."""
    state = State(MASTER_STORAGE, 140001, seed=9)
    twin = state.copy()
    plan = StepPlan(*state.buffers(), master_params=state.master, lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(10)
    for step in (1, 2, 6, 7):
        fresh = (rng.standard_normal(state.grads.size) * 10.0 ** rng.uniform(-2, 0)).astype(BF16)
        state.grads[:] = twin.grads[:] = fresh
        norm = reference_grad_norm([fresh], 2.0)
        before = state.copy()
        got = plan.step(step, max_grad_norm=0.5 * norm)
        want = fused_step(*twin.buffers(), master_params=twin.master, step=step, lr=1e-2, weight_decay=0.1,
                          max_grad_norm=0.5 * norm)
        assert _bits(got) == _bits(want)
        assert_norm_close(got, norm, fresh.size, 2.0)
        assert state.snapshot() == twin.snapshot()
        assert_stepped_as_oracle(before, state, reference_clip_coefficient(got, 0.5 * norm), 1.0,
                                 {"step": step, "lr": 1e-2, "weight_decay": 0.1})


# --- layouts and tensor lists --------------------------------------------------------------------

LAYOUT_SHAPES = [(1,), (17,), (1000,), (65537,), (3, 5), (140001,), (64,)]
LAYOUT_GROUP_OF = [0, 1, 2, 0, 1, 2, 0]
LAYOUT_STEPS = [3, 10, 5, 40, 7, 12, 100]
LAYOUT_HAS_GRAD = np.array([True, True, False, True, False, True, True])
GROUPS = [
    {"lr": 1e-2},
    {"lr": 3e-3, "betas": (0.8, 0.99), "weight_decay": 0.1, "decoupled_weight_decay": True, "maximize": True},
    {"lr": 1e-3, "weight_decay": 0.05, "flavour": "authors"},
]


def _layout_states(storage, grad_scale, seed):
    """The layout, one State per segment, and flat States packing them (padding: a NaN sentinel in
    every buffer; the inactive segments' gradients planted with a NaN, an inf and a huge value)."""
    layout = FlatLayout(LAYOUT_SHAPES, groups=LAYOUT_GROUP_OF, align=64)
    parts = [State(storage, int(np.prod(shape)), seed=seed + i, grad_scale=grad_scale, shape=shape)
             for i, shape in enumerate(LAYOUT_SHAPES)]
    for part, active in zip(parts, LAYOUT_HAS_GRAD):
        if not active:
            part.grads.reshape(-1)[[0, 1, -1]] = [np.nan, np.inf, 1e4]
    flat = object.__new__(State)
    flat.storage = storage
    for name in ("params", "grads", "exp_avg", "exp_avg_sq", "master", "remainders"):
        values = [getattr(part, name) for part in parts]
        setattr(flat, name, None if values[0] is None else layout.pack(values))
    padding = np.ones(layout.size, dtype=bool)
    for s in layout.segments:
        padding[s.offset:s.offset + s.size] = False
    for buffer in flat.every():
        with np.errstate(invalid="ignore"):
            buffer[padding] = np.nan
    return layout, parts, flat, padding


@pytest.mark.parametrize("storage", [F32_STORAGE, MASTER_STORAGE], ids=_short)
@pytest.mark.parametrize("norm_type,grad_scale", [(2.0, 1.0), (INF, 1024.0), (3.0, 3000.0)], ids=str)
@pytest.mark.parametrize("clips", [True, False], ids=["clips", "within"])
def test_layout_step_clips_by_the_active_segments_norm(storage, norm_type, grad_scale, clips):
    """Several groups and steps, two inactive segments holding NaN/inf gradients and NaN padding: the
    norm is the active segments' (nothing else read), active segments are the oracle's clipped step,
    inactive ones and the padding are not written."""
    layout, parts, flat, padding = _layout_states(storage, grad_scale, seed=20)
    active = [part.grads for part, on in zip(parts, LAYOUT_HAS_GRAD) if on]
    norm = reference_grad_norm(active, norm_type, grad_scale)
    max_norm = norm * (0.3 if clips else 3.0)
    before = flat.copy()
    got = fused_step_layout(layout, *flat.buffers(), steps=LAYOUT_STEPS, groups=GROUPS, has_grad=LAYOUT_HAS_GRAD,
                            **flat.keeper, grad_scale=grad_scale, max_grad_norm=max_norm, norm_type=norm_type)
    assert_norm_close(got, norm, sum(g.size for g in active), norm_type)
    coefficient = reference_clip_coefficient(got, max_norm)
    assert (coefficient < 1.0) == clips
    for i, segment in enumerate(layout.segments):
        part = slice(segment.offset, segment.offset + segment.size)
        if LAYOUT_HAS_GRAD[i]:
            assert_stepped_as_oracle(before, flat, coefficient, grad_scale,
                                     {"step": LAYOUT_STEPS[i], **GROUPS[segment.group]}, part)
        else:
            for now, then in zip(flat.every(), before.every()):
                assert now[part].tobytes() == then[part].tobytes(), f"inactive segment {i} was written"
    for now, then in zip(flat.every(), before.every()):
        assert now[padding].tobytes() == then[padding].tobytes(), "the padding was written"
    assert flat.grads.tobytes() == before.grads.tobytes()
    if not clips:
        plain = before.copy()
        fused_step_layout(layout, *plain.buffers(), steps=LAYOUT_STEPS, groups=GROUPS, has_grad=LAYOUT_HAS_GRAD,
                          **plain.keeper, grad_scale=grad_scale)
        assert flat.snapshot() == plain.snapshot(), "a coefficient of 1 changed the layout step"


TENSOR_SIZES = (1, 17, 1000, 65537, 140001, 33)
TENSOR_GROUP_OF = [0, 1, 0, 1, 0, 1]
TENSOR_HAS_GRAD = np.array([True, True, True, False, True, True])


def _tensor_states(storage, grad_scale, seed):
    parts = [State(storage, n, seed=seed + i, grad_scale=grad_scale) for i, n in enumerate(TENSOR_SIZES)]
    for part, active in zip(parts, TENSOR_HAS_GRAD):
        if not active:
            part.grads[[0, -1]] = [np.nan, np.inf]
    return parts


def _lists(parts, with_grads=True):
    lists = [[getattr(p, name) for p in parts] for name in ("params", "grads", "exp_avg", "exp_avg_sq")]
    if not with_grads:
        lists[1] = None
    keeper = {}
    if parts[0].master is not None:
        keeper = {"master_params": [p.master for p in parts]}
    return lists, keeper


@pytest.mark.parametrize("storage", [F32_STORAGE, BF16_STORAGE], ids=_short)
@pytest.mark.parametrize("norm_type,grad_scale", [(2.0, 1024.0), (1.0, 1.0), (INF, 3000.0)], ids=str)
@pytest.mark.parametrize("clips", [True, False], ids=["clips", "within"])
def test_tensor_list_step_clips_by_the_active_tensors_norm(storage, norm_type, grad_scale, clips):
    parts = _tensor_states(storage, grad_scale, seed=30)
    active = [p.grads for p, on in zip(parts, TENSOR_HAS_GRAD) if on]
    norm = reference_grad_norm(active, norm_type, grad_scale)
    max_norm = norm * (0.3 if clips else 3.0)
    before = [p.copy() for p in parts]
    steps = [2, 9, 9, 9, 30, 7]
    lists, keeper = _lists(parts)
    got = fused_step_multi(*lists, **keeper, steps=steps, groups=GROUPS[:2], group_index=TENSOR_GROUP_OF,
                           has_grad=TENSOR_HAS_GRAD, grad_scale=grad_scale, max_grad_norm=max_norm,
                           norm_type=norm_type)
    assert_norm_close(got, norm, sum(g.size for g in active), norm_type)
    coefficient = reference_clip_coefficient(got, max_norm)
    assert (coefficient < 1.0) == clips
    for i, (old, new) in enumerate(zip(before, parts)):
        if TENSOR_HAS_GRAD[i]:
            assert_stepped_as_oracle(old, new, coefficient, grad_scale,
                                     {"step": steps[i], **GROUPS[TENSOR_GROUP_OF[i]]})
        else:
            assert new.snapshot() == old.snapshot(), f"inactive tensor {i} was written"
    if not clips:
        plain = [p.copy() for p in before]
        lists, keeper = _lists(plain)
        fused_step_multi(*lists, **keeper, steps=steps, groups=GROUPS[:2], group_index=TENSOR_GROUP_OF,
                         has_grad=TENSOR_HAS_GRAD, grad_scale=grad_scale)
        assert [p.snapshot() for p in parts] == [p.snapshot() for p in plain]


@pytest.mark.parametrize("storage", [F32_STORAGE, MASTER_STORAGE], ids=_short)
def test_a_tensor_plan_given_gradients_per_step_clips_by_each_steps_norm(storage):
    """A tensor plan bound without gradients: each step's grads= (None where inactive) are the ones
    measured and clipped; the same as fused_step_multi bit for bit."""
    parts = _tensor_states(storage, 1.0, seed=40)
    twins = [p.copy() for p in parts]
    lists, keeper = _lists(parts, with_grads=False)
    plan = StepPlan(*lists, **keeper, groups=GROUPS[:2], group_index=TENSOR_GROUP_OF)
    rng = np.random.default_rng(41)
    grad_dtype = parts[0].grads.dtype
    for step, norm_type in zip((1, 6, 7), (2.0, INF, 3.0)):
        has_grad = TENSOR_HAS_GRAD if step != 7 else np.ones(len(parts), dtype=bool)
        fresh = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 0)).astype(grad_dtype) if on else None
                 for n, on in zip(TENSOR_SIZES, has_grad)]
        norm = reference_grad_norm([g for g in fresh if g is not None], norm_type)
        before = [p.copy() for p in parts]
        for p, g in zip(before, fresh):
            p.grads = g
        got = plan.step(steps=[step] * len(parts), has_grad=has_grad, grads=fresh, max_grad_norm=0.5 * norm,
                        norm_type=norm_type)
        assert_norm_close(got, norm, sum(g.size for g in fresh if g is not None), norm_type)
        for twin, g in zip(twins, fresh):
            if g is not None:
                twin.grads = g
        twin_lists, twin_keeper = _lists(twins)  # bound grads: the inactive tensor's NaN/inf ones, unread
        want = fused_step_multi(*twin_lists, **twin_keeper, steps=[step] * len(parts), groups=GROUPS[:2],
                                group_index=TENSOR_GROUP_OF, has_grad=has_grad, max_grad_norm=0.5 * norm,
                                norm_type=norm_type)
        assert _bits(got) == _bits(want)
        coefficient = reference_clip_coefficient(got, 0.5 * norm)
        for i, (old, new, twin) in enumerate(zip(before, parts, twins)):
            assert _written(new) == _written(twin), f"tensor {i} differs from fused_step_multi's"
            if has_grad[i]:
                assert_stepped_as_oracle(old, new, coefficient, 1.0, {"step": step, **GROUPS[TENSOR_GROUP_OF[i]]})
            else:
                assert _written(new) == _written(old), f"inactive tensor {i} was written"


def _written(state: State) -> list[bytes]:
    """The bytes of the buffers a step writes."""
    return [b.tobytes() for b in (state.params, state.exp_avg, state.exp_avg_sq, state.master, state.remainders)
            if b is not None]


def test_no_active_gradient_has_norm_zero_and_writes_nothing():
    layout, parts, flat, _ = _layout_states(F32_STORAGE, 1.0, seed=50)
    snapshot = flat.snapshot()
    none = np.zeros(len(layout), dtype=bool)
    assert fused_step_layout(layout, *flat.buffers(), steps=LAYOUT_STEPS, groups=GROUPS, has_grad=none,
                             max_grad_norm=1.0) == 0.0
    assert flat.snapshot() == snapshot
    assert StepPlan([], [], [], []).step(steps=[], max_grad_norm=1.0) == 0.0
    assert StepPlan([], [], [], []).grad_norm() == 0.0
    assert reference_grad_norm([np.zeros(0)]) == 0.0


# --- determinism ---------------------------------------------------------------------------------


def _with_threads(count, action):
    previous = numba.get_num_threads()
    numba.set_num_threads(count)
    try:
        return action()
    finally:
        numba.set_num_threads(previous)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_the_norm_is_the_same_bits_for_any_thread_count_and_on_every_run(norm_type):
    """Flat buffers of five blocks, a layout and a tensor list: the norm's bits with 1 thread, with
    2 (or the most there are) and again; the clipped steps' buffers bit for bit too."""
    most = min(2, numba.config.NUMBA_NUM_THREADS)
    size = 4 * BLOCK + 4099
    state = State(F32_STORAGE, size, seed=60, grad_scale=3.0)
    layout, _, flat, _ = _layout_states(F32_STORAGE, 3.0, seed=61)
    parts = _tensor_states(F32_STORAGE, 3.0, seed=62)
    lists, _ = _lists(parts)
    plans = [StepPlan(*state.buffers()), StepPlan(*flat.buffers(), layout=layout, groups=GROUPS),
             StepPlan(*lists, groups=GROUPS[:2], group_index=TENSOR_GROUP_OF)]
    masks = [None, LAYOUT_HAS_GRAD, TENSOR_HAS_GRAD]
    for plan, has_grad in zip(plans, masks):
        kwargs = {} if has_grad is None else {"has_grad": has_grad}
        norms = [_bits(_with_threads(n, lambda: plan.grad_norm(norm_type, grad_scale=3.0, **kwargs)))
                 for n in (most, 1, most, 1, most)]
        assert len(set(norms)) == 1, f"{plan.kind}: {norms}"
    runs = []
    for threads in (1, most, most):
        copy = state.copy()
        norm = _with_threads(threads, lambda: fused_step(*copy.buffers(), step=8, grad_scale=3.0, max_grad_norm=0.1,
                                                         norm_type=norm_type))
        runs.append((_bits(norm), copy.snapshot()))
    assert runs[0] == runs[1] == runs[2]


# --- non-finite gradients ------------------------------------------------------------------------

NON_FINITE = {"nan": [np.nan], "inf": [np.inf], "-inf": [-np.inf], "nan+inf": [np.inf, np.nan]}


def _expected_non_finite(bad: str) -> float:
    return math.nan if "nan" in bad else INF


def _plant(grads: np.ndarray, bad: str, where: int) -> None:
    flat = grads.reshape(-1)
    for k, value in enumerate(NON_FINITE[bad]):
        flat[(where + 7 * k) % flat.size] = value


def _assert_non_finite_norm(got, bad: str) -> None:
    assert type(got) is float
    if "nan" in bad:
        assert math.isnan(got), got
    else:
        assert got == INF, got


def _step_kind(kind, storage, bad, where, **kwargs):
    """Plant ``bad`` at ``where`` in an active gradient and step through ``kind``; the states before
    and after, and the returned norm."""
    if kind == "flat":
        state = State(storage, 140001, seed=70)
        _plant(state.grads, bad, where)
        before = state.copy()
        return before, state, fused_step(*state.buffers(), **state.keeper, step=8, lr=1e-2, **kwargs)
    if kind == "layout":
        layout, _, state, _ = _layout_states(storage, 1.0, seed=71)
        segment = layout.segments[5]  # the 140001-element one, active
        _plant(state.grads[segment.offset:segment.offset + segment.size], bad, where)
        before = state.copy()
        return before, state, fused_step_layout(layout, *state.buffers(), steps=LAYOUT_STEPS, groups=GROUPS,
                                                has_grad=LAYOUT_HAS_GRAD, **state.keeper, **kwargs)
    parts = _tensor_states(storage, 1.0, seed=72)
    _plant(parts[4].grads, bad, where)
    before = [p.copy() for p in parts]
    lists, keeper = _lists(parts)
    return before, parts, fused_step_multi(*lists, **keeper, steps=[8] * len(parts), groups=GROUPS[:2],
                                           group_index=TENSOR_GROUP_OF, has_grad=TENSOR_HAS_GRAD, **kwargs)


def _snapshots(states):
    return [s.snapshot() for s in states] if isinstance(states, list) else states.snapshot()


@pytest.mark.parametrize("kind", ["flat", "layout", "tensors"])
@pytest.mark.parametrize("bad,where", [("nan", 0), ("inf", 140000), ("-inf", BLOCK + 5), ("nan+inf", 2 * BLOCK)],
                         ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.0])
def test_check_finite_skips_a_non_finite_step_and_returns_the_norm(kind, bad, where, norm_type):
    """The pre-pass is the finite check: every buffer bit for bit as before; the norm NaN (any NaN)
    or inf (an infinity), whatever the norm type."""
    before, after, got = _step_kind(kind, F32_STORAGE, bad, where, check_finite=True, max_grad_norm=1.0,
                                    norm_type=norm_type)
    _assert_non_finite_norm(got, bad)
    assert _snapshots(after) == _snapshots(before), "a step with a non-finite norm wrote"


@pytest.mark.parametrize("storage", STEP_STORAGES, ids=_short)
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_check_finite_skips_non_finite_gradients_of_every_format(storage, bad):
    state = State(storage, 65537, seed=73)
    _plant(state.grads, bad, 65536)  # the second block's only element
    snapshot = state.snapshot()
    got = fused_step(*state.buffers(), **state.keeper, step=8, check_finite=True, max_grad_norm=1.0,
                     norm_type=INF if bad == "inf" else 2.0)
    _assert_non_finite_norm(got, bad)
    assert state.snapshot() == snapshot


def test_float64_gradients_whose_powers_overflow_count_as_non_finite():
    """Finite float64 gradients with an infinite 2-norm (squares overflow, as in torch and the oracle):
    check_finite skips; their 1-norm is finite and the step goes on."""
    state = State(STEP_STORAGES[1], 1000, seed=74)
    state.grads[10] = 1e200
    snapshot = state.snapshot()
    with np.errstate(over="ignore"):
        assert reference_grad_norm([state.grads], 2.0) == INF
    assert fused_step(*state.buffers(), step=8, check_finite=True, max_grad_norm=1.0) == INF
    assert state.snapshot() == snapshot
    before = state.copy()
    got = fused_step(*state.buffers(), step=8, check_finite=True, max_grad_norm=1.0, norm_type=1.0)
    assert_norm_close(got, reference_grad_norm([before.grads], 1.0), 1000, 1.0)
    assert_stepped_as_oracle(before, state, reference_clip_coefficient(got, 1.0), 1.0, {"step": 8})


@pytest.mark.parametrize("kind", ["flat", "layout", "tensors"])
@pytest.mark.parametrize("storage", [F32_STORAGE, MASTER_STORAGE], ids=_short)
@pytest.mark.parametrize("bad,where", [("nan", 5), ("inf", 140000), ("-inf", BLOCK)], ids=str)
def test_without_check_finite_the_step_goes_on_as_torch_clips(kind, storage, bad, where):
    """torch's clip_grad_norm_ then step: coefficient 0 for an inf norm (every gradient 0, the
    infinite one 0 * inf = NaN), NaN for a NaN norm (everything NaN); the oracle fed those gradients."""
    if kind == "tensors" and storage is MASTER_STORAGE:
        storage = BF16_STORAGE  # the tensor-list storages of this file
    before, after, got = _step_kind(kind, storage, bad, where, max_grad_norm=1.0)
    _assert_non_finite_norm(got, bad)
    coefficient = reference_clip_coefficient(got, 1.0)
    assert coefficient == 0.0 if bad != "nan" else math.isnan(coefficient)
    if kind == "flat":
        assert_stepped_as_oracle(before, after, coefficient, 1.0, {"step": 8, "lr": 1e-2})
    elif kind == "layout":
        layout = FlatLayout(LAYOUT_SHAPES, groups=LAYOUT_GROUP_OF, align=64)
        for i, segment in enumerate(layout.segments):
            part = slice(segment.offset, segment.offset + segment.size)
            if LAYOUT_HAS_GRAD[i]:
                assert_stepped_as_oracle(before, after, coefficient, 1.0,
                                         {"step": LAYOUT_STEPS[i], **GROUPS[segment.group]}, part)
            else:
                assert all(a[part].tobytes() == b[part].tobytes() for a, b in zip(after.every(), before.every()))
    else:
        for i, (old, new) in enumerate(zip(before, after)):
            if TENSOR_HAS_GRAD[i]:
                assert_stepped_as_oracle(old, new, coefficient, 1.0, {"step": 8, **GROUPS[TENSOR_GROUP_OF[i]]})
            else:
                assert new.snapshot() == old.snapshot()


@pytest.mark.parametrize("kind", ["flat", "layout", "tensors"])
@pytest.mark.parametrize("flag", [True, np.array(True)], ids=["bool", "array"])
@pytest.mark.parametrize("check_finite", [False, True])
def test_found_inf_skips_the_step_but_returns_the_norm(kind, flag, check_finite):
    before, after, got = _step_kind(kind, F32_STORAGE, "nan", 3, found_inf=flag, check_finite=check_finite,
                                    max_grad_norm=1.0)
    _assert_non_finite_norm(got, "nan")
    assert _snapshots(after) == _snapshots(before)
    # finite gradients: the norm the step would have clipped by
    state = State(F32_STORAGE, 140001, seed=75, grad_scale=3.0)
    snapshot = state.snapshot()
    got = fused_step(*state.buffers(), step=8, grad_scale=3.0, found_inf=flag, check_finite=check_finite,
                     max_grad_norm=1.0, norm_type=3.0)
    assert_norm_close(got, reference_grad_norm([state.grads], 3.0, 3.0), 140001, 3.0)
    assert state.snapshot() == snapshot


# --- a norm given, norm only, several plans -----------------------------------------------------


def _plan_of(kind, storage, seed):
    """A plan of ``kind`` over fresh states, its step's keywords, and the states."""
    if kind == "flat":
        state = State(storage, 140001, seed=seed, grad_scale=1024.0)
        return StepPlan(*state.buffers(), **state.keeper, lr=1e-2, weight_decay=0.1), {"step": 9}, state
    if kind == "layout":
        layout, _, state, _ = _layout_states(storage, 1024.0, seed=seed)
        return (StepPlan(*state.buffers(), layout=layout, **state.keeper, groups=GROUPS),
                {"steps": LAYOUT_STEPS, "has_grad": LAYOUT_HAS_GRAD}, state)
    parts = _tensor_states(storage, 1024.0, seed=seed)
    lists, keeper = _lists(parts, with_grads=False)
    plan = StepPlan(*lists, **keeper, groups=GROUPS[:2], group_index=TENSOR_GROUP_OF)
    grads = [p.grads if on else None for p, on in zip(parts, TENSOR_HAS_GRAD)]
    return plan, {"steps": [9] * len(parts), "has_grad": TENSOR_HAS_GRAD, "grads": grads}, parts


def _norm_kwargs(kind, step_kwargs):
    return {k: v for k, v in step_kwargs.items() if k in ("has_grad", "grads")}


@pytest.mark.parametrize("kind", ["flat", "layout", "tensors"])
@pytest.mark.parametrize("norm_type", [2.0, INF, 0.5])
def test_a_given_norm_steps_as_the_pre_pass_and_grad_norm_writes_nothing(kind, norm_type):
    plan, step_kwargs, states = _plan_of(kind, F32_STORAGE, seed=80)
    twin_plan, _, twins = _plan_of(kind, F32_STORAGE, seed=80)
    snapshot = _snapshots(states)
    norm = plan.grad_norm(norm_type, grad_scale=1024.0, **_norm_kwargs(kind, step_kwargs))
    assert _snapshots(states) == snapshot, "grad_norm() wrote"
    assert type(norm) is float and norm > 0.0
    max_norm = 0.5 * norm
    given_back = plan.step(**step_kwargs, grad_scale=1024.0, max_grad_norm=max_norm, norm_type=norm_type,
                           grad_norm=norm)
    measured = twin_plan.step(**step_kwargs, grad_scale=1024.0, max_grad_norm=max_norm, norm_type=norm_type)
    assert _bits(given_back) == _bits(norm) == _bits(measured)
    assert _snapshots(states) == _snapshots(twins), "a given norm stepped differently from the pre-pass's"
    assert _snapshots(states) != snapshot


@pytest.mark.parametrize("form", [float, np.float32, np.float64, np.array, int], ids=lambda f: f.__name__)
def test_a_given_norm_sets_the_coefficient(form):
    """The coefficient comes from the given norm, not from the gradients (a host float, a NumPy
    scalar, a 0-d array or an int): ten times the real norm clips ten times less."""
    state = State(F32_STORAGE, 65537, seed=81)
    real = reference_grad_norm([state.grads])
    given = form(round(10 * real)) if form is int else form(10 * real)
    plan = StepPlan(*state.buffers(), lr=1e-2)
    before = state.copy()
    got = plan.step(6, max_grad_norm=real, grad_norm=given)
    assert type(got) is float and got == float(given)
    assert_stepped_as_oracle(before, state, reference_clip_coefficient(float(given), real), 1.0,
                             {"step": 6, "lr": 1e-2})


def test_a_given_non_finite_norm_skips_with_check_finite_and_zeroes_without():
    state = State(F32_STORAGE, 1000, seed=82)
    plan = StepPlan(*state.buffers(), check_finite=True)
    snapshot = state.snapshot()
    for given in (math.nan, INF):
        got = plan.step(6, max_grad_norm=1.0, grad_norm=given)
        assert _bits(got) == _bits(given)
        assert state.snapshot() == snapshot
    before = state.copy()
    got = StepPlan(*state.buffers()).step(6, max_grad_norm=1.0, grad_norm=INF)
    assert got == INF
    assert_stepped_as_oracle(before, state, 0.0, 1.0, {"step": 6})


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_combined_norms_of_two_plans_are_the_norm_of_their_union(norm_type):
    """Two flat plans (a 16-bit one among them) and a layout: combine_norms of their norms is the
    oracle's norm of all their gradients, and clipping each plan by it is the oracle's step with the
    union's coefficient."""
    first = State(F32_STORAGE, 140001, seed=90, grad_scale=4.0)
    second = State(F32_STORAGE, 17, seed=91, grad_scale=4.0)
    layout, parts, third, _ = _layout_states(F32_STORAGE, 4.0, seed=92)
    plans = [StepPlan(*first.buffers(), lr=1e-2), StepPlan(*second.buffers(), lr=1e-2),
             StepPlan(*third.buffers(), layout=layout, groups=GROUPS)]
    layout_kwargs = {"has_grad": LAYOUT_HAS_GRAD}
    norms = [plans[0].grad_norm(norm_type, grad_scale=4.0), plans[1].grad_norm(norm_type, grad_scale=4.0),
             plans[2].grad_norm(norm_type, grad_scale=4.0, **layout_kwargs)]
    union = [first.grads, second.grads] + [p.grads for p, on in zip(parts, LAYOUT_HAS_GRAD) if on]
    want = reference_grad_norm(union, norm_type, 4.0)
    combined = combine_norms(norms, norm_type)
    # each plan's norm carries its own bound; combining adds a few roundings of the power and the root
    assert_norm_close(combined, want, sum(g.size for g in union), norm_type)
    if norm_type == INF:
        assert combined == max(norms)
    before = [first.copy(), second.copy(), third.copy()]
    max_norm = 0.5 * combined
    returned = [plans[0].step(8, grad_scale=4.0, max_grad_norm=max_norm, norm_type=norm_type, grad_norm=combined),
                plans[1].step(8, grad_scale=4.0, max_grad_norm=max_norm, norm_type=norm_type, grad_norm=combined),
                plans[2].step(steps=LAYOUT_STEPS, has_grad=LAYOUT_HAS_GRAD, grad_scale=4.0, max_grad_norm=max_norm,
                              norm_type=norm_type, grad_norm=combined)]
    assert returned == [combined] * 3
    coefficient = reference_clip_coefficient(combined, max_norm)
    assert_stepped_as_oracle(before[0], first, coefficient, 4.0, {"step": 8, "lr": 1e-2})
    assert_stepped_as_oracle(before[1], second, coefficient, 4.0, {"step": 8, "lr": 1e-2})
    for i, segment in enumerate(layout.segments):
        if LAYOUT_HAS_GRAD[i]:
            assert_stepped_as_oracle(before[2], third, coefficient, 4.0, {"step": LAYOUT_STEPS[i],
                                     **GROUPS[segment.group]}, slice(segment.offset, segment.offset + segment.size))


def test_combine_norms_edge_cases():
    assert combine_norms([], 2.0) == 0.0 and combine_norms([], INF) == 0.0
    assert math.isnan(combine_norms([1.0, math.nan], INF)) and math.isnan(combine_norms([math.nan, 1.0], 2.0))
    assert combine_norms([3.0, INF], 2.0) == INF and combine_norms([3.0, INF], INF) == INF
    assert combine_norms([3.0, 4.0], 2.0) == 5.0 and combine_norms([3.0, 4.0], 1.0) == 7.0
    assert combine_norms([3.0, 4.0], INF) == 4.0


# --- bad input: refused before anything is written ----------------------------------------------

BAD_CLIPS = [
    ({"norm_type": 0}, ValueError, "norm_type must be > 0"),
    ({"norm_type": 0.0}, ValueError, "norm_type must be > 0"),
    ({"norm_type": -1}, ValueError, "norm_type must be > 0"),
    ({"norm_type": -INF}, ValueError, "norm_type must be > 0"),
    ({"norm_type": math.nan}, ValueError, "norm_type must be > 0"),
    ({"norm_type": "two"}, TypeError, "norm_type must be a real number"),
    ({"norm_type": True}, TypeError, "norm_type must be a real number"),
    ({"norm_type": np.bool_(True)}, TypeError, "norm_type must be a real number"),
    ({"norm_type": None}, TypeError, "norm_type must be a real number"),
    ({"norm_type": [2.0]}, TypeError, "norm_type must be a real number"),
    ({"max_grad_norm": 0}, ValueError, "max_grad_norm must be > 0"),
    ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm must be > 0"),
    ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm must be > 0"),
    ({"max_grad_norm": -INF}, ValueError, "max_grad_norm must be > 0"),
    ({"max_grad_norm": math.nan}, ValueError, "max_grad_norm must be > 0"),
    ({"max_grad_norm": "1.0"}, TypeError, "max_grad_norm must be a real number"),
    ({"max_grad_norm": True}, TypeError, "max_grad_norm must be a real number"),
    ({"max_grad_norm": np.array([1.0])}, TypeError, "max_grad_norm must be a real number"),
]
BAD_GIVEN_NORMS = [
    ({"grad_norm": -1.0}, ValueError, "grad_norm must be >= 0"),
    ({"grad_norm": -INF}, ValueError, "grad_norm must be >= 0"),
    ({"grad_norm": np.array(-2.0)}, ValueError, "grad_norm must be >= 0"),
    ({"grad_norm": [1.0]}, TypeError, "grad_norm must be a real number"),
    ({"grad_norm": np.array([1.0])}, TypeError, "grad_norm must be a real number"),
    ({"grad_norm": "1.0"}, TypeError, "grad_norm must be a real number"),
    ({"grad_norm": True}, TypeError, "grad_norm must be a real number"),
    ({"grad_norm": 1.0, "max_grad_norm": None}, TypeError, "pass max_grad_norm"),
]


def _all_buffers(states):
    return [b for s in (states if isinstance(states, list) else [states]) for b in s.every()]


def _assert_refused(states, error, match, call):
    snapshot = [b.copy() for b in _all_buffers(states)]
    with pytest.raises(error, match=match):
        call()
    for then, now in zip(snapshot, _all_buffers(states)):
        assert then.tobytes() == now.tobytes(), "a refused call wrote"


@pytest.mark.parametrize("kind", ["flat", "layout", "tensors"])
@pytest.mark.parametrize("bad,error,match", BAD_CLIPS, ids=lambda x: repr(x))
def test_bad_clipping_arguments_are_refused_before_anything_is_written(kind, bad, error, match):
    args = {"max_grad_norm": 1.0, **bad}
    if kind == "flat":
        state = State(MASTER_STORAGE, 1000, seed=100)
        _assert_refused(state, error, match,
                        lambda: fused_step(*state.buffers(), **state.keeper, step=8, check_finite=True, **args))
    elif kind == "layout":
        layout, _, state, _ = _layout_states(F32_STORAGE, 1.0, seed=101)
        _assert_refused(state, error, match, lambda: fused_step_layout(
            layout, *state.buffers(), steps=LAYOUT_STEPS, groups=GROUPS, has_grad=LAYOUT_HAS_GRAD, **args))
    else:
        parts = _tensor_states(F32_STORAGE, 1.0, seed=102)
        lists, _ = _lists(parts)
        _assert_refused(parts, error, match, lambda: fused_step_multi(*lists, steps=[3] * len(parts), **args))


@pytest.mark.parametrize("kind", ["flat", "layout", "tensors"])
@pytest.mark.parametrize("bad,error,match", BAD_CLIPS + BAD_GIVEN_NORMS, ids=lambda x: repr(x))
def test_bad_arguments_to_a_plans_clipped_step_are_refused_before_anything_is_written(kind, bad, error, match):
    plan, step_kwargs, states = _plan_of(kind, F32_STORAGE, seed=103)
    args = {"max_grad_norm": 1.0, "grad_norm": 2.0, **bad}
    _assert_refused(states, error, match, lambda: plan.step(**step_kwargs, **args))
    # the plan still steps afterwards, with the norm it is given
    assert plan.step(**step_kwargs, max_grad_norm=1.0, grad_norm=2.0) == 2.0


@pytest.mark.parametrize("kind", ["flat", "layout", "tensors"])
@pytest.mark.parametrize("bad,error,match", [
    ({"norm_type": 0}, ValueError, "norm_type must be > 0"),
    ({"norm_type": "two"}, TypeError, "norm_type must be a real number"),
    ({"norm_type": True}, TypeError, "norm_type must be a real number"),
    ({"grad_scale": 0.0}, ValueError, "grad_scale must be"),
    ({"grad_scale": "2"}, TypeError, "grad_scale must be"),
], ids=lambda x: repr(x))
def test_bad_arguments_to_grad_norm_are_refused(kind, bad, error, match):
    plan, step_kwargs, states = _plan_of(kind, F32_STORAGE, seed=104)
    _assert_refused(states, error, match, lambda: plan.grad_norm(**bad, **_norm_kwargs(kind, step_kwargs)))


def test_a_bad_step_argument_beside_clipping_is_refused_before_the_pre_pass_writes_anything():
    state = State(F32_STORAGE, 1000, seed=105)
    _assert_refused(state, ValueError, "step must be >= 1",
                    lambda: fused_step(*state.buffers(), step=0, max_grad_norm=1e-3))
    _assert_refused(state, ValueError, "grad_scale must be",
                    lambda: fused_step(*state.buffers(), step=3, max_grad_norm=1e-3, grad_scale=-1.0))


@pytest.mark.parametrize("norm_type,same_as", [("inf", INF), ("INF", INF), (np.float32(2.0), 2.0), (2, 2.0),
                                               (np.int64(1), 1.0), (np.float64(3.0), 3.0)], ids=repr)
def test_norm_type_spellings_torch_takes(norm_type, same_as):
    state = State(F32_STORAGE, 1000, seed=106)
    got = StepPlan(*state.buffers()).grad_norm(norm_type)
    assert _bits(got) == _bits(StepPlan(*state.buffers()).grad_norm(same_as))
    assert _bits(fused_step(*state.copy().buffers(), step=3, max_grad_norm=np.float32(1.0),
                            norm_type=norm_type)) == _bits(got)


@pytest.mark.parametrize("scalar", [np.float64, np.float32, np.float16], ids=lambda t: t.__name__)
def test_a_numpy_scalar_grad_scale_is_taken_as_the_float_it_holds(scalar):
    """grad_scale=np.float32(3000) (read off a float32 array, say) is the number 3000: the returned
    norm is a float accumulated and scaled in float64, the same as with grad_scale=3000.0, and the
    clipped float64 step is the oracle's (NumPy's NEP 50 would make ``1.0 / np.float32(3000)`` a
    float32, and every product with it float32, if the checked value were not used)."""
    state = State(STEP_STORAGES[1], 140001, seed=107, grad_scale=3000.0)
    norm = reference_grad_norm([state.grads], 2.0, 3000.0)
    as_float = fused_step(*state.copy().buffers(), step=8, grad_scale=3000.0, max_grad_norm=0.5 * norm)
    before = state.copy()
    got = fused_step(*state.buffers(), step=8, grad_scale=scalar(3000.0), max_grad_norm=0.5 * norm)
    assert_norm_close(got, norm, 140001, 2.0)
    assert _bits(got) == _bits(as_float)
    assert_stepped_as_oracle(before, state, reference_clip_coefficient(got, 0.5 * norm), 3000.0, {"step": 8})


# --- a property ----------------------------------------------------------------------------------


@settings(max_examples=100)
@given(
    size=st.one_of(st.integers(1, 300), st.sampled_from([BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 17])),
    dtype=st.sampled_from([F32, F64]),
    norm_type=st.one_of(st.sampled_from([1.0, 2.0, INF]), st.floats(0.25, 8.0)),
    log_ratio=st.floats(-3.0, 3.0),
    log_grad_scale=st.integers(-10, 16),
    step=st.sampled_from([1, 4, 6, 50]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_size_norm_type_max_norm_and_grad_scale_match_the_oracle(size, dtype, norm_type, log_ratio,
                                                                     log_grad_scale, step, seed):
    storage = F32_STORAGE if dtype == F32 else STEP_STORAGES[1]
    grad_scale = 2.0**log_grad_scale * (1.0 if seed % 2 else 1.5)
    state = State(storage, size, seed=seed, grad_scale=grad_scale)
    norm = reference_grad_norm([state.grads], norm_type, grad_scale)
    max_norm = norm * 10.0**log_ratio
    hyper = {"step": step, "lr": 1e-2, "weight_decay": 0.01}
    before = state.copy()
    got = fused_step(*state.buffers(), **hyper, grad_scale=grad_scale, max_grad_norm=max_norm, norm_type=norm_type)
    assert_norm_close(got, norm, size, norm_type)
    assert_stepped_as_oracle(before, state, reference_clip_coefficient(got, max_norm), grad_scale, hyper)
