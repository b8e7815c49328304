"""Gradient clipping in the CUDA kernels, run on the CPU by the g++ harness (tests/cuda_harness.py).

The clipping pre-pass (``prepass_*`` in norm mode: per-thread float64 partials, the last thread of
each block and the last block adding them in a fixed order, then the norm, torch's coefficient, the
gradient factor and the skip flag, all in device memory) and the update kernels reading that factor,
driven with the CUDA backend's own argument packing (``launch.norm_request``, ``launch.prepass_*``)
and its norm grid: flat buffers, layout segments and tensor lists, grads in every format, params
kept alone, beside an fp32 master or by int16 remainders. The norm against
``reference_grad_norm``, the step against the oracle on the clipped gradients and, given the same
norm (so the same factor), against the Numba backend bit for bit; non-finite gradients with and
without check_finite, found_inf, a given norm, the norm alone, and determinism.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

import cuda_harness
from cuda_harness import bits, scalars_for
from fastradam.clipping import Clip, clip_coefficient, finish_norm
from fastradam.layout import FlatLayout
from fastradam.reference import reference_clip_coefficient, reference_grad_norm
from fastradam.scalars import pack_rows
from fastradam.spec import NORM_CODES
from fastradam.storage import Storage
from oracle_check import assert_matches_oracle
from tests.cases import NUMPY_DTYPES
from test_cuda_host import backend, harness, numba_backend  # noqa: F401  (shared fixtures)

pytestmark = pytest.mark.skipif(cuda_harness.compiler() is None, reason="no host C++ compiler (g++ or $CXX)")

NORM_TYPES = (2.0, 1.0, math.inf, 3.0)
NORM_IDS = ("two", "one", "inf", "three")
#: Flat sizes: one element, a head and tail only, a few blocks, several blocks of the norm grid.
SIZES = (1, 7, 1000, 70001)
#: Grads in every format; params alone, beside an fp32 master, or kept by int16 remainders.
STORAGES = (
    Storage("float32", "float32", "float32"),
    Storage("float64", "float64", "float64"),
    Storage("bfloat16", "bfloat16", "float32", master=True),
    Storage("float16", "float16", "float32"),
    Storage("bfloat16", "float32", "float32", remainders=True),
)
STORAGE_IDS = [s.short for s in STORAGES]
#: One storage per grads format, for the multi-tensor kernels.
MULTI_STORAGES = STORAGES[:4]
MULTI_IDS = STORAGE_IDS[:4]
GRAD_SCALE = 8.0
HYPER = dict(step=9, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, decoupled_weight_decay=True,
             maximize=False)


# --- Buffers ------------------------------------------------------------------------------------


def placed(values: np.ndarray, dtype: np.dtype, offset: int) -> np.ndarray:
    """``values`` as ``dtype`` in a view ``offset`` elements past a 64-byte boundary, sentinels around
    (NaN, or -1 for integers)."""
    n = values.size
    storage = np.empty((n + offset + 8) * dtype.itemsize + 64, dtype=np.uint8)
    start = -storage.ctypes.data % 64
    raw = storage[start:start + (n + offset + 8) * dtype.itemsize].view(dtype)
    raw[...] = -1 if dtype.kind == "i" else np.nan
    view = raw[offset:offset + n]
    view[...] = values if dtype.kind == "i" else values.astype(dtype)
    return view


class Step:
    """Random buffers of one storage, ``offset`` elements past a 64-byte boundary: (p, g, m, v) and the
    side buffer (the fp32 master, the int16 remainders, or None); grads scaled by GRAD_SCALE."""

    def __init__(self, harness, storage: Storage, n: int, seed: int, offset: int = 1) -> None:
        rng = np.random.default_rng([seed, n, offset])
        dtypes = [NUMPY_DTYPES[f] for f in (storage.params, storage.grads, storage.moments, storage.moments)]
        values = (rng.standard_normal(n), GRAD_SCALE * rng.standard_normal(n) * 2.0 ** rng.integers(-3, 3, n),
                  0.1 * rng.standard_normal(n), 1e-6 + 1e-2 * rng.random(n))
        self.harness, self.storage = harness, storage
        self.buffers = tuple(placed(x, d, offset) for x, d in zip(values, dtypes))
        self.side = None
        if storage.master:
            self.side = placed(self.buffers[0].astype(np.float64), np.dtype(np.float32), offset)
        elif storage.remainders:
            high, low = harness.split_remainders(values[0].astype(np.float32))
            self.buffers[0].view(np.uint16)[...] = high
            self.side = placed(low, np.dtype(np.int16), offset)
        self.before = self.snapshot()

    @property
    def math(self) -> np.dtype:
        return self.storage.math_dtype

    def snapshot(self) -> list[np.ndarray]:
        """Copies of every buffer."""
        return [b.copy() for b in (*self.buffers, *(() if self.side is None else (self.side,)))]

    def params_of(self, buffers: list[np.ndarray]) -> np.ndarray:
        """The params' values in ``buffers`` (a snapshot): the master, the remainders joined, or the params."""
        if self.storage.master:
            return buffers[4]
        if self.storage.remainders:
            return self.harness.join_remainders(buffers[0].view(np.uint16), buffers[4])
        return buffers[0]

    def check_oracle(self, factor: float) -> None:
        """The step matches the oracle's on the gradients times ``factor`` (float64), grads unread."""
        now = self.snapshot()
        gradients = self.before[1].astype(np.float64) * factor
        assert_matches_oracle((self.params_of(self.before), gradients, self.before[2], self.before[3]),
                              (self.params_of(now), now[2], now[3]), HYPER)
        np.testing.assert_array_equal(bits(now[1]), bits(self.before[1]))

    def unchanged(self) -> bool:
        """Whether every buffer keeps its bits."""
        return all(a.tobytes() == b.tobytes() for a, b in zip(self.snapshot(), self.before))

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        return pack_rows([scalars_for(HYPER)], self.math, GRAD_SCALE)

    def run(self, clip: Clip | None, **keywords) -> float | None:
        """One flat step through the harness (the backend's norm grid; the update on 7 x 32 threads)."""
        return self.harness.step(self.buffers, *self.tables(), 7, 32, master=self.side, clip=clip, **keywords)

    def numba(self, numba_backend, clip: Clip) -> list[np.ndarray]:
        """The Numba backend's step of ``clip`` on copies of the buffers before; the copies after."""
        theirs = [b.copy() for b in self.before]
        side = theirs[4] if len(theirs) == 5 else None
        numba_backend.bind_flat(*(numba_backend.as_array(b) for b in theirs[:4]),
                                master=None if side is None else numba_backend.as_array(side))(*self.tables(), clip=clip)
        return theirs


def clip_of(norm_type: float, max_norm: float | None, norm=None) -> Clip:
    return Clip(max_norm, norm_type, 1.0 / GRAD_SCALE, norm)


def factor_of(norm: float, max_norm: float) -> float:
    """The gradient factor of the rules: inv_grad_scale * torch's coefficient, in float64."""
    return (1.0 / GRAD_SCALE) * clip_coefficient(norm, max_norm)


def same_bits(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    """Every pair of buffers holds the same bits (NaN included)."""
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(bits(a), bits(b))


# --- The rules, one value at a time -------------------------------------------------------------

SPECIALS = (0.0, 5e-324, 1e-300, 1e-6, 0.3, 1.0, 1.0 + 2.0**-52, 7.5, 1e300, math.inf, math.nan)


def test_the_kernels_clipping_rules_are_the_clipping_modules(harness):
    """radam.cuh's norm_of_total, clip_coefficient and combine_norms equal fastradam.clipping's,
    bit for bit (NaN kept: a NaN norm clips by NaN, an infinite one by 0)."""
    lib = harness.lib
    for name, argtypes in (("clip_coefficient", [ctypes.c_double] * 2),
                           ("norm_of_total", [ctypes.c_double, ctypes.c_int, ctypes.c_double, ctypes.c_double]),
                           ("combine_norms", [ctypes.c_int, ctypes.c_double, ctypes.c_double])):
        getattr(lib, name).restype, getattr(lib, name).argtypes = ctypes.c_double, argtypes
    same = lambda a, b: np.float64(a).tobytes() == np.float64(b).tobytes()  # noqa: E731
    for norm in SPECIALS:
        for max_norm in (1e-3, 1.0, 2.5, 1e30, math.inf):
            assert same(lib.clip_coefficient(norm, max_norm), clip_coefficient(norm, max_norm)), (norm, max_norm)
            if not math.isinf(max_norm):
                assert same(clip_coefficient(norm, max_norm), reference_clip_coefficient(norm, max_norm))
        for norm_type in (*NORM_TYPES, 0.5):
            if norm_type < 1.0 and norm > 1e150:
                continue  # Python's float power raises OverflowError where C's gives inf
            code = Clip(1.0, norm_type).code
            assert same(lib.norm_of_total(norm, code, norm_type, 0.125), finish_norm(norm, norm_type, 0.125))
    for a in SPECIALS:
        for b in SPECIALS:
            assert same(lib.combine_norms(NORM_CODES["two"], a, b), a + b)
            want = math.nan if math.isnan(a) or math.isnan(b) else max(a, b)
            assert same(lib.combine_norms(NORM_CODES["inf"], a, b), want), (a, b)


# --- Flat buffers -------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES, ids=STORAGE_IDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=NORM_IDS)
def test_flat_clipped_step_matches_the_reference_norm_and_the_oracle(harness, storage, n, norm_type):
    step = Step(harness, storage, n, seed=int(norm_type if norm_type < 9 else 9))
    want = reference_grad_norm([step.before[1]], norm_type, GRAD_SCALE)
    max_norm = 0.5 * want  # clips: the coefficient is about 1/2
    norm = step.run(clip_of(norm_type, max_norm))
    assert norm == pytest.approx(want, rel=1e-12, abs=0)
    factor = float(harness.scratch.factor)
    assert factor == factor_of(norm, max_norm)  # the rules' factor of the kernel's norm, bit for bit
    assert 0.49 / GRAD_SCALE < factor < 0.51 / GRAD_SCALE
    assert int(harness.scratch.flag) == 0 and not harness.scratch.counters.any()  # counters left zero
    step.check_oracle(factor)


@pytest.mark.parametrize("storage", STORAGES, ids=STORAGE_IDS)
def test_flat_clipped_step_rounds_like_the_numba_backend(harness, numba_backend, storage):
    """Given the norm the kernel computed, the Numba backend folds the same factor and steps to the same
    bits; its own norm (other tiles) agrees to float64 rounding."""
    step = Step(harness, storage, 5003, seed=11)
    norm = step.run(clip_of(2.0, 1.0))
    same_bits(step.snapshot(), step.numba(numba_backend, clip_of(2.0, 1.0, norm)))
    assert numba_backend.bind_flat(*(numba_backend.as_array(b) for b in step.before[:4]))(
        *step.tables(), clip=clip_of(2.0, None)) == pytest.approx(norm, rel=1e-12, abs=0)


@pytest.mark.parametrize("storage", STORAGES[:3], ids=STORAGE_IDS[:3])
def test_a_norm_within_max_norm_steps_as_no_clipping(harness, storage):
    """A coefficient of 1 makes the factor inv_grad_scale exactly: the bits of the unclipped step."""
    step, twin = Step(harness, storage, 4099, seed=3), Step(harness, storage, 4099, seed=3)
    step.run(clip_of(2.0, 1e30))
    twin.run(None)
    same_bits(step.snapshot(), twin.snapshot())
    assert not step.unchanged()


#: The fan-in of the pre-pass's reduction tree (radam.cu's kFanIn).
FAN_IN = 16


def tree_levels(threads: int) -> list[int]:
    """The sizes of the reduction tree's levels over ``threads`` partials, leaves first."""
    sizes = [threads]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // FAN_IN))
    return sizes


@pytest.mark.parametrize("launch", ((1, 1), (3, 64), (5, 32), (40, 256), (1024, 256)), ids=str)
def test_any_grid_adds_up_to_the_norm_and_leaves_the_counters_zero(harness, launch):
    """The reduction does not depend on the backend's grid: any grid and block sizes give the norm (to
    float64 rounding; the bits follow the grid), and every arrival counter is back at zero."""
    step = Step(harness, STORAGES[2], 70001, seed=5)
    for norm_type in NORM_TYPES:
        norm = harness.step(step.buffers, *step.tables(), 3, 64, master=step.side, clip=clip_of(norm_type, None),
                            norm_launch=launch)
        assert norm == pytest.approx(reference_grad_norm([step.before[1]], norm_type, GRAD_SCALE), rel=1e-12, abs=0)
        assert not harness.scratch.counters.any()
        used = sum(tree_levels(launch[0] * launch[1]))  # every value of the tree written, nothing past it
        assert used <= harness.scratch.partials.size
        assert not np.isnan(harness.scratch.partials[:used]).any() and np.isnan(harness.scratch.partials[used:]).all()


def test_the_norm_has_the_same_bits_on_every_run(harness):
    runs = []
    for _ in range(2):
        step = Step(harness, STORAGES[2], 70001, seed=6)
        runs.append((step.run(clip_of(2.0, 1.0)), step.snapshot()))
    assert np.float64(runs[0][0]).tobytes() == np.float64(runs[1][0]).tobytes()
    same_bits(runs[0][1], runs[1][1])


@pytest.mark.parametrize("storage", STORAGES, ids=STORAGE_IDS)
def test_the_norm_alone_writes_nothing(harness, storage):
    step = Step(harness, storage, 1000, seed=7)
    for norm_type in NORM_TYPES:
        norm = step.run(clip_of(norm_type, None), check_finite=True)
        assert norm == pytest.approx(reference_grad_norm([step.before[1]], norm_type, GRAD_SCALE), rel=1e-12, abs=0)
        assert np.isnan(harness.scratch.factor)  # no factor is written either
    assert step.unchanged() and harness.counts() == (0, 0)


def test_an_empty_buffer_has_norm_zero(harness):
    step = Step(harness, STORAGES[0], 0, seed=0)
    assert step.run(clip_of(2.0, 1.0)) == 0.0 and step.run(clip_of(math.inf, 1.0)) == 0.0


# --- Non-finite gradients, found_inf ------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES, ids=STORAGE_IDS)
@pytest.mark.parametrize("bad", (math.nan, math.inf, -math.inf), ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("norm_type", (2.0, math.inf), ids=("two", "inf"))
def test_non_finite_gradients_skip_with_check_finite_and_clip_as_torch_without(harness, numba_backend, storage, bad,
                                                                             norm_type):
    step = Step(harness, storage, 70001, seed=8)
    for where in (0, 70000):
        step.buffers[1][where] = bad
    step.before = step.snapshot()
    norm = step.run(clip_of(norm_type, 1.0), check_finite=True)
    assert math.isnan(norm) if math.isnan(bad) else norm == math.inf
    assert int(harness.scratch.flag) == 1 and step.unchanged()
    # without check_finite the step goes on with torch's coefficient (NaN, or 0 for an inf norm)
    assert math.isnan(step.run(clip_of(norm_type, 1.0))) == math.isnan(norm)
    assert not step.unchanged()
    same_bits(step.snapshot(), step.numba(numba_backend, clip_of(norm_type, 1.0, norm)))


def test_float64_squares_that_overflow_make_the_norm_non_finite(harness):
    step = Step(harness, STORAGES[1], 1000, seed=9)
    step.buffers[1][500] = 1e200
    step.before = step.snapshot()
    assert step.run(clip_of(2.0, 1.0), check_finite=True) == math.inf and step.unchanged()
    assert step.run(clip_of(math.inf, 1.0), check_finite=True) == 1e200 / GRAD_SCALE
    assert not step.unchanged()


FLAGS = (np.array(True), np.array(1.0, np.float32), np.array(np.nan, np.float32), np.array(7, np.int64))


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f"{f.dtype}-{f}")
@pytest.mark.parametrize("check_finite", (False, True))
def test_found_inf_skips_every_clipped_kernel_after_the_norm(harness, flag, check_finite):
    step = Step(harness, STORAGES[2], 4099, seed=10)
    want = reference_grad_norm([step.before[1]], 2.0, GRAD_SCALE)
    clip = clip_of(2.0, 0.5)
    keywords = dict(master=step.side, found_inf=flag, check_finite=check_finite, clip=clip)
    layout = FlatLayout([(4099,)])
    norms = [step.run(clip, found_inf=flag, check_finite=check_finite),
             harness.step_segments(step.buffers, layout.arrays, np.zeros(1, np.int32), *step.tables(), 3, 64,
                                   **keywords),
             harness.step_tensors([(*step.buffers, step.side)], np.zeros(1, np.int32), *step.tables(), 3, 64,
                                  found_inf=flag, check_finite=check_finite, clip=clip),
             harness.step_capturable(step.buffers, np.array(9, np.int64), 1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                     weight_decay=0.05, decoupled_weight_decay=True, maximize=False, grid=3,
                                     block=64, grad_scale=GRAD_SCALE, **keywords)]
    assert norms == pytest.approx([want] * 4, rel=1e-12, abs=0)
    assert step.unchanged() and harness.counts() == (0, 0)


def test_a_clear_found_inf_steps(harness):
    step, twin = Step(harness, STORAGES[0], 1000, seed=12), Step(harness, STORAGES[0], 1000, seed=12)
    step.run(clip_of(1.0, 1.0), found_inf=np.array(0.0, np.float32), check_finite=True)
    twin.run(clip_of(1.0, 1.0))
    same_bits(step.snapshot(), twin.snapshot())
    assert not step.unchanged()


# --- A given norm -----------------------------------------------------------------------------


@pytest.mark.parametrize("given", (0.75, np.array(0.75), np.array(0.75, np.float32)), ids=("float", "f64", "f32"))
def test_a_given_norm_clips_without_reading_the_gradients(harness, numba_backend, given):
    """The coefficient comes from the given norm (here not the gradients' own), and no partial is
    written: one thread finishes from it."""
    step = Step(harness, STORAGES[2], 1000, seed=13)
    norm = step.run(clip_of(2.0, 0.25, given))
    assert norm == float(np.float32(0.75)) if np.asarray(given).dtype == np.float32 else norm == 0.75
    assert np.isnan(harness.scratch.partials).all() and not harness.scratch.counters.any()
    assert float(harness.scratch.factor) == factor_of(norm, 0.25)
    step.check_oracle(factor_of(norm, 0.25))
    same_bits(step.snapshot(), step.numba(numba_backend, clip_of(2.0, 0.25, norm)))


@pytest.mark.parametrize("given", (math.nan, math.inf), ids=("nan", "inf"))
def test_a_given_non_finite_norm_skips_with_check_finite(harness, numba_backend, given):
    step = Step(harness, STORAGES[0], 1000, seed=14)
    assert np.float64(step.run(clip_of(2.0, 1.0, np.array(given)), check_finite=True)).tobytes() == \
        np.float64(given).tobytes()
    assert step.unchanged()
    step.run(clip_of(2.0, 1.0, given))  # without check_finite: NaN everywhere, or zero gradients
    same_bits(step.snapshot(), step.numba(numba_backend, clip_of(2.0, 1.0, given)))


# --- Layout segments and tensor lists -----------------------------------------------------------

#: Segment (tensor) sizes: heads and tails, several tiles; and which are active this step.
MULTI_SIZES = (1, 7, 1000, 70001, 3, 4099, 64)
ACTIVE = np.array([True, True, False, True, True, False, True])


def multi_values(storage: Storage, seed: int) -> list[tuple[np.ndarray, ...]]:
    """Float64 (p, g, m, v) per piece, grads scaled; an inactive piece's grads are NaN (never read)."""
    rng = np.random.default_rng(seed)
    pieces = []
    for n, active in zip(MULTI_SIZES, ACTIVE):
        g = GRAD_SCALE * rng.standard_normal(n) if active else np.full(n, np.nan)
        pieces.append((rng.standard_normal(n), g, 0.1 * rng.standard_normal(n), 1e-6 + 1e-2 * rng.random(n)))
    return pieces


def active_norm(pieces: list[tuple], storage: Storage, norm_type: float) -> float:
    grads = NUMPY_DTYPES[storage.grads]
    return reference_grad_norm([p[1].astype(grads) for p, a in zip(pieces, ACTIVE) if a], norm_type, GRAD_SCALE)


def layout_step(harness, storage: Storage, seed: int, clip: Clip, base: int = 1, **keywords) -> tuple:
    """One clipped segments step over MULTI_SIZES (NaN padding); returns (layout, pieces, flats before,
    flats after, master before, master after, norm)."""
    layout = FlatLayout([(n,) for n in MULTI_SIZES])
    pieces = multi_values(storage, seed)
    flats = []
    for k, fmt in enumerate((storage.params, storage.grads, storage.moments, storage.moments)):
        flat = np.full(layout.size, np.nan)
        for segment, piece in zip(layout.segments, pieces):
            flat[segment.offset:segment.offset + segment.size] = piece[k]
        flats.append(placed(flat, NUMPY_DTYPES[fmt], base))
    master = placed(flats[0].astype(np.float64), np.dtype(np.float32), base) if storage.master else None
    before = [f.copy() for f in flats]
    master_before = None if master is None else master.copy()
    floats, ints = pack_rows([scalars_for(HYPER)], storage.math_dtype, GRAD_SCALE)
    norm = harness.step_segments(tuple(flats), layout.arrays, np.where(ACTIVE, 0, -1).astype(np.int32), floats, ints,
                                 3, 64, master=master, clip=clip, **keywords)
    return layout, pieces, before, flats, master_before, master, norm


@pytest.mark.parametrize("storage", MULTI_STORAGES, ids=MULTI_IDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=NORM_IDS)
def test_segments_clip_by_the_norm_of_the_active_segments(harness, storage, norm_type):
    probe = layout_step(harness, storage, 1, clip_of(norm_type, None))
    want = active_norm(probe[1], storage, norm_type)
    assert probe[6] == pytest.approx(want, rel=1e-12, abs=0)  # padding and inactive NaN grads unread
    layout, _, before, after, master_before, master, norm = layout_step(harness, storage, 1,
                                                                        clip_of(norm_type, 0.5 * want))
    assert norm == probe[6] and not harness.scratch.counters.any()
    factor = float(harness.scratch.factor)
    assert factor == factor_of(norm, 0.5 * want)
    untouched = np.ones(layout.size, dtype=bool)
    for segment, active in zip(layout.segments, ACTIVE):
        if not active:
            continue
        part = slice(segment.offset, segment.offset + segment.size)
        untouched[part] = False
        params_before, params_after = (before[0], after[0]) if master is None else (master_before, master)
        assert_matches_oracle((params_before[part], before[1][part].astype(np.float64) * factor, before[2][part],
                               before[3][part]), (params_after[part], after[2][part], after[3][part]), HYPER)
    for got, want_bits in zip(after, before):
        np.testing.assert_array_equal(bits(got[untouched]), bits(want_bits[untouched]))
    np.testing.assert_array_equal(bits(after[1]), bits(before[1]))


def test_segments_clipped_step_rounds_like_the_numba_backend(harness, numba_backend):
    storage = MULTI_STORAGES[0]
    layout, _, before, after, _, _, norm = layout_step(harness, storage, 2, clip_of(2.0, 1.0))
    theirs = [np.array(b) for b in before]
    floats, ints = pack_rows([scalars_for(HYPER)], storage.math_dtype, GRAD_SCALE)
    numba_backend.bind_segments(*theirs, layout.arrays)(np.where(ACTIVE, 0, -1).astype(np.int32), floats, ints,
                                                        clip=clip_of(2.0, 1.0, norm))
    same_bits(after, theirs)


@pytest.mark.parametrize("bad", (math.nan, math.inf), ids=("nan", "inf"))
def test_segments_skip_non_finite_active_gradients_with_check_finite(harness, bad):
    layout = FlatLayout([(n,) for n in MULTI_SIZES])
    flats = [placed(np.full(layout.size, 0.5), np.dtype(np.float32), 1) for _ in range(4)]
    flats[1][layout.segments[3].offset + 4097] = bad
    before = [f.copy() for f in flats]
    floats, ints = pack_rows([scalars_for(HYPER)], np.float32, GRAD_SCALE)
    rows = np.where(ACTIVE, 0, -1).astype(np.int32)
    norm = harness.step_segments(tuple(flats), layout.arrays, rows, floats, ints, 3, 64, check_finite=True,
                                 clip=clip_of(1.0, 1.0))
    assert (math.isnan(norm) if math.isnan(bad) else norm == math.inf) and int(harness.scratch.flag) == 1
    assert all(a.tobytes() == b.tobytes() for a, b in zip(flats, before))
    rows[3] = -1  # the bad element's segment inactive: not read, and the step goes on
    assert math.isfinite(harness.step_segments(tuple(flats), layout.arrays, rows, floats, ints, 3, 64,
                                               check_finite=True, clip=clip_of(1.0, 1.0)))
    assert flats[0].tobytes() != before[0].tobytes()


def tensor_list(storage: Storage, seed: int) -> tuple[list[tuple], list[tuple]]:
    """Separate tensors of MULTI_SIZES (offsets 0, 1, 2 past 64-byte boundaries, in turn) in ``storage``,
    with an fp32 master when it has one; and their float64 values."""
    pieces = multi_values(storage, seed)
    tensors = []
    for i, piece in enumerate(pieces):
        formats = (storage.params, storage.grads, storage.moments, storage.moments)
        tensor = tuple(placed(x, NUMPY_DTYPES[f], i % 3) for x, f in zip(piece, formats))
        if storage.master:
            tensor += (placed(tensor[0].astype(np.float64), np.dtype(np.float32), i % 3),)
        tensors.append(tensor)
    return tensors, pieces


@pytest.mark.parametrize("storage", MULTI_STORAGES, ids=MULTI_IDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=NORM_IDS)
def test_tensor_lists_clip_by_the_norm_of_the_active_tensors(harness, storage, norm_type):
    tensors, pieces = tensor_list(storage, 3)
    before = [tuple(t.copy() for t in tensor) for tensor in tensors]
    want = active_norm(pieces, storage, norm_type)
    floats, ints = pack_rows([scalars_for(HYPER)], storage.math_dtype, GRAD_SCALE)
    rows = np.where(ACTIVE, 0, -1).astype(np.int32)
    norm = harness.step_tensors(tensors, rows, floats, ints, 3, 64, clip=clip_of(norm_type, 0.5 * want))
    assert norm == pytest.approx(want, rel=1e-12, abs=0) and not harness.scratch.counters.any()
    factor = float(harness.scratch.factor)
    assert factor == factor_of(norm, 0.5 * want)
    for tensor, old, active in zip(tensors, before, ACTIVE):
        if active:
            params_before, params_after = (old[0], tensor[0]) if len(old) == 4 else (old[4], tensor[4])
            assert_matches_oracle((params_before, old[1].astype(np.float64) * factor, old[2], old[3]),
                                  (params_after, tensor[2], tensor[3]), HYPER)
        else:
            same_bits(list(tensor), list(old))


def test_tensor_list_clipped_step_rounds_like_the_numba_backend(harness, numba_backend):
    tensors, _ = tensor_list(MULTI_STORAGES[0], 4)
    theirs = [tuple(np.array(t) for t in tensor) for tensor in tensors]
    floats, ints = pack_rows([scalars_for(HYPER)], np.float32, GRAD_SCALE)
    rows = np.where(ACTIVE, 0, -1).astype(np.int32)
    norm = harness.step_tensors(tensors, rows, floats, ints, 3, 64, clip=clip_of(2.0, 1.0))
    numba_backend.bind_tensors(*(list(role) for role in zip(*theirs)))(rows, floats, ints,
                                                                       clip=clip_of(2.0, 1.0, norm))
    for ours, their in zip(tensors, theirs):
        same_bits(list(ours), list(their))


# --- The capturable kernels ---------------------------------------------------------------------


@pytest.mark.parametrize("storage", STORAGES, ids=STORAGE_IDS)
def test_capturable_kernels_clip_as_the_host_step_kernels(harness, storage):
    """The flat and segments capturable kernels read the same factor: the norm and every bit of the
    host-scalar kernels' clipped steps."""
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, decoupled_weight_decay=True, maximize=False)
    ours, twin = Step(harness, storage, 5003, seed=15), Step(harness, storage, 5003, seed=15)
    norm = harness.step_capturable(ours.buffers, np.array(9, np.int32), 1e-2, grid=3, block=64, master=ours.side,
                                   grad_scale=GRAD_SCALE, clip=clip_of(3.0, 1.0), **options)
    assert norm == twin.run(clip_of(3.0, 1.0))
    same_bits(ours.snapshot(), twin.snapshot())
    assert not ours.unchanged()
    layout = FlatLayout([(5003,)])
    group = cuda_harness._group(0.9, 0.999, 1e-8, 0.0, 0.05, True, False, cuda_harness.PRESETS["torch"])
    ours, twin = Step(harness, storage, 5003, seed=16), Step(harness, storage, 5003, seed=16)
    norm = harness.step_segments_capturable(ours.buffers, layout.arrays, np.zeros(1, np.int32),
                                            np.array([9.0], np.float32), [group], [1e-2], 3, 64, master=ours.side,
                                            grad_scale=GRAD_SCALE, clip=clip_of(1.0, 1.0))
    assert norm == harness.step_segments(twin.buffers, layout.arrays, np.zeros(1, np.int32), *twin.tables(), 3, 64,
                                         master=twin.side, clip=clip_of(1.0, 1.0))
    same_bits(ours.snapshot(), twin.snapshot())


# --- The backend's host side ---------------------------------------------------------------------


def test_the_norm_grid_depends_on_the_work_alone(backend):
    from fastradam.backends.cuda import module

    assert module.norm_grid(0, 4) == module.norm_grid(1, 4) == 1
    assert module.norm_grid(256 * 4 * 4 * 10, 4) == 10 and module.norm_grid(256 * 4 * 4 * 10 + 1, 4) == 11
    assert module.norm_grid(10**12, 8) == module.NORM_BLOCKS
    assert module.norm_tile_grid(0) == 1 and module.norm_tile_grid(37) == 37
    assert module.norm_tile_grid(10**6) == module.NORM_BLOCKS


def test_a_host_norm_is_refused_as_a_device_norm(backend):
    with pytest.raises(TypeError, match="grad_norm must be a 0-d CUDA array, got a host ndarray"):
        backend.check_norm(np.zeros(()))


def test_norm_arguments_of_the_finite_check_are_null(backend):
    from fastradam.backends.cuda import launch

    assert all(int(a) == 0 for a in launch.FINITE_CHECK[:6])  # partials, counters, given, code, norm, factor
    partials, counters, norm, factor = (np.zeros(3), np.zeros(2, np.uint32), np.zeros(()), np.zeros(()))
    request = launch.norm_request(clip_of(math.inf, None), partials=partials, counters=counters, norm=norm,
                                  factor=factor, check_finite=True)
    assert request[0] is partials and request[1] is counters and request[4] is norm
    assert int(request[5]) == 0  # the norm alone: no factor written
    assert (int(request[6]), float(request[8]), int(request[10])) == (NORM_CODES["inf"], 1.0 / GRAD_SCALE, 1)


# --- The backend's own launches, on a host stand-in for the device ------------------------------
#
# The CUDA backend's launch functions (``radam_step``, ``radam_step_segments``, ``radam_step_tensors``,
# the capturable ones), their pre-pass gate and scratch (``prepass``) run unchanged here: CuPy is
# replaced by NumPy arrays that stand in for device arrays, and each compiled kernel by the harness's
# build of the same one. What they launch must be what the harness launches: the same bits.


class HostArray(np.ndarray):
    """A NumPy array standing in for a CuPy array on device 0: ``data.ptr``, ``data.device_id``,
    ``set`` and ``get``."""

    @property
    def data(self):  # noqa: D102  (CuPy's MemoryPointer, as the backend reads it)
        return type("MemoryPointer", (), {"ptr": self.ctypes.data, "device_id": 0})()

    def set(self, values: np.ndarray, stream=None) -> None:
        self[...] = np.asarray(values).reshape(self.shape)

    def get(self) -> np.ndarray:
        return np.array(self)


def on_device(array: np.ndarray) -> HostArray:
    """``array`` as a stand-in device array (16-bit floats as the backend's bit views)."""
    view = {"bfloat16": np.uint16, "float16": np.int16}.get(array.dtype.name)
    return (array if view is None else array.view(view)).view(HostArray)


class HostDevice:
    """``cupy.cuda.Device``: a context of device 0 with an SM count."""

    attributes = {"MultiProcessorCount": 132}

    def __init__(self, device_id: int = 0) -> None:
        assert device_id == 0

    def __enter__(self) -> HostDevice:
        return self

    def __exit__(self, *exc) -> None:
        return None


class HostStream:
    ptr = 0

    @staticmethod
    def is_capturing() -> bool:
        return False


class HostCupy:
    """The part of CuPy the backend's launches use, on NumPy."""

    ndarray = HostArray

    class cuda:  # noqa: N801  (cupy.cuda)
        Device = HostDevice
        get_current_stream = staticmethod(lambda *device: HostStream)

        class runtime:  # noqa: N801
            memsetAsync = staticmethod(lambda ptr, value, size, stream: ctypes.memset(ptr, value, size))

    empty = staticmethod(lambda shape, dtype=np.float64: np.empty(shape, dtype).view(HostArray))
    zeros = staticmethod(lambda shape, dtype=np.float64: np.zeros(shape, dtype).view(HostArray))
    full = staticmethod(lambda shape, value, dtype=None: np.full(shape, value, dtype).view(HostArray))
    asarray = staticmethod(lambda value, dtype=None: np.array(value, dtype=dtype).view(HostArray))


@pytest.fixture
def device(harness, backend, monkeypatch):
    """The CUDA backend with CuPy replaced by :class:`HostCupy` and its kernels by the harness's."""
    from weakref import WeakKeyDictionary

    from fastradam.backends.cuda import device_args, module, prepass, tables
    from fastradam.storage import FORMATS

    def kernel(device_id: int, storage: Storage, name: str):
        template = name.split("<", 1)[0].removeprefix("fastradam::")
        suffix = FORMATS[storage.grads].short if template.startswith("prepass_") else storage.short
        return lambda grid, block, arguments: harness.launch(template, suffix, grid[0], block[0], arguments)

    for room in (backend, prepass, tables):
        monkeypatch.setattr(room, "cupy", HostCupy)
    for room in (backend, prepass):
        monkeypatch.setattr(room, "_kernel", kernel)
    monkeypatch.setattr(module, "_sm_count", lambda device_id: HostDevice.attributes["MultiProcessorCount"])
    monkeypatch.setattr(device_args, "backend_for", lambda names, objects: type("cuda", (), {"name": "cuda"}))
    monkeypatch.setattr(device_args, "as_array", lambda value: value)
    monkeypatch.setattr(prepass, "_norm_scratches", {})  # nothing of the stand-in outlives the test
    monkeypatch.setattr(prepass, "_finite_flags", {})
    monkeypatch.setattr(tables, "_LAYOUT_TABLES", WeakKeyDictionary())
    return backend


def launched(step: Step, offset: int = 1) -> tuple[list[HostArray], HostArray | None]:
    """Copies of a Step's buffers before, as stand-in device arrays (and the side buffer), at the Step's
    alignment (the norm's partials follow the grads' 16-byte packs: its bits, their alignment)."""
    arrays = [on_device(placed(b, b.dtype, offset)) for b in step.before]
    return arrays[:4], (arrays[4] if len(arrays) == 5 else None)


def host_bits(arrays) -> list[np.ndarray]:
    return [np.array(a) for a in arrays if a is not None]


@pytest.mark.parametrize("storage", STORAGES, ids=STORAGE_IDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=NORM_IDS)
def test_the_backends_flat_launches_are_the_harness_launches(harness, device, storage, norm_type):
    """radam_step and radam_step_capturable with clip: the norm (a fresh 0-d float64 array) and every
    bit of the harness's launch of the same kernels."""
    step = Step(harness, storage, 70001, seed=20)
    arrays, side = launched(step)
    capturable, capturable_side = launched(step)
    want = step.run(clip_of(norm_type, 1.0))
    norm = device.radam_step(*arrays, *step.tables(), master=side, clip=clip_of(norm_type, 1.0))
    assert isinstance(norm, HostArray) and norm.shape == () and norm.dtype == np.float64 and float(norm) == want
    same_bits(host_bits((*arrays, side)), step.snapshot())
    group = cuda_harness._group(0.9, 0.999, 1e-8, 0.0, 0.05, True, False, cuda_harness.PRESETS["torch"])
    norm = device.radam_step_capturable(*capturable, on_device(np.array(9, np.int64)), 1e-2, group,
                                        master=capturable_side, grad_scale=GRAD_SCALE, clip=clip_of(norm_type, 1.0))
    assert float(norm) == want
    same_bits(host_bits((*capturable, capturable_side)), step.snapshot())


def test_the_backends_flat_launch_without_clip_is_unchanged(harness, device):
    step = Step(harness, STORAGES[2], 4099, seed=21)
    arrays, side = launched(step)
    assert device.radam_step(*arrays, *step.tables(), master=side, check_finite=True) is None
    step.run(None, check_finite=True)
    same_bits(host_bits((*arrays, side)), step.snapshot())


def test_the_backends_flat_launch_skips_found_inf_non_finite_norms_and_norm_only_calls(harness, device):
    step = Step(harness, STORAGES[0], 1000, seed=22)
    want = reference_grad_norm([step.before[1]], 2.0, GRAD_SCALE)
    arrays, _ = launched(step)
    for keywords in (dict(found_inf=True), dict(found_inf=on_device(np.array(1.0, np.float32))),
                     dict(clip=clip_of(2.0, None), check_finite=True)):
        clip = keywords.pop("clip", clip_of(2.0, 0.1))
        assert float(device.radam_step(*arrays, *step.tables(), clip=clip, **keywords)) == pytest.approx(want,
                                                                                                         rel=1e-12)
    arrays[1][3] = np.nan
    assert math.isnan(float(device.radam_step(*arrays, *step.tables(), clip=clip_of(2.0, 0.1), check_finite=True)))
    arrays[1][3] = step.before[1][3]
    same_bits(host_bits(arrays), step.before)
    empty = [on_device(np.zeros(0, np.float32)) for _ in range(4)]
    assert float(device.radam_step(*empty, *step.tables(), clip=clip_of(2.0, 0.1))) == 0.0


@pytest.mark.parametrize("given", (0.75, "device"))
def test_the_backends_launch_clips_by_a_given_norm(harness, device, given):
    step = Step(harness, STORAGES[2], 1000, seed=23)
    arrays, side = launched(step)
    norm = on_device(np.array(0.75, np.float32)) if given == "device" else given
    returned = device.radam_step(*arrays, *step.tables(), master=side, clip=clip_of(2.0, 0.25, norm))
    assert float(returned) == 0.75 and returned is not norm
    step.run(clip_of(2.0, 0.25, 0.75))
    same_bits(host_bits((*arrays, side)), step.snapshot())


@pytest.mark.parametrize("storage", MULTI_STORAGES, ids=MULTI_IDS)
def test_the_backends_segment_and_tensor_launches_are_the_harness_launches(harness, device, storage):
    clip = clip_of(2.0, 1.0)
    _, _, before, after, master_before, master, want = layout_step(harness, storage, 24, clip)
    layout = FlatLayout([(n,) for n in MULTI_SIZES])
    rows = np.where(ACTIVE, 0, -1).astype(np.int32)
    floats, ints = pack_rows([scalars_for(HYPER)], storage.math_dtype, GRAD_SCALE)
    flats = [on_device(placed(b, b.dtype, 1)) for b in before]
    side = None if master_before is None else on_device(placed(master_before, master_before.dtype, 1))
    norm = device.radam_step_segments(*flats, layout.arrays, rows, floats, ints, master=side, clip=clip)
    assert float(norm) == want
    same_bits(host_bits((*flats, side)), [*after, *(() if master is None else (master,))])
    if master is None:  # the capturable launch of the same segments
        group = cuda_harness._group(0.9, 0.999, 1e-8, 0.0, 0.05, True, False, cuda_harness.PRESETS["torch"])
        flats = [on_device(placed(b, b.dtype, 1)) for b in before]
        norm = device.radam_step_segments_capturable(*flats, layout.arrays, rows,
                                                     on_device(np.full(len(MULTI_SIZES), 9, np.int32)), [group],
                                                     [1e-2], grad_scale=GRAD_SCALE, clip=clip)
        assert float(norm) == want
        same_bits(host_bits(flats), after)
    tensors, _ = tensor_list(storage, 25)
    ours = [[on_device(placed(t, t.dtype, i % 3)) for t in tensor] for i, tensor in enumerate(tensors)]
    want = harness.step_tensors(tensors, rows, floats, ints, 3, 64, clip=clip)
    roles = [list(role) for role in zip(*ours)]
    norm = device.radam_step_tensors(*roles[:4], rows, floats, ints, master=roles[4] if storage.master else None,
                                     clip=clip)
    assert float(norm) == want
    for mine, theirs in zip(ours, tensors):
        same_bits(host_bits(mine), list(theirs))
    assert float(device.radam_step_tensors([], [], [], [], rows[:0], floats, ints, clip=clip)) == 0.0
