"""Mixed precision in the CUDA kernels, run on the CPU by the g++ harness (tests/cuda_harness.py).

The bit-exact bfloat16/float16 conversions of radam.cuh (which the harness uses; the GPU uses
the CUDA intrinsics, checked by tests/test_cuda_gpu.py) against ml_dtypes/NumPy ``astype``;
every storage combination of tests/test_mixed_precision.py through the flat, segment, tensor
and capturable kernels against the oracle and, bit for bit, against the Numba backend; master
weights; grad_scale; found_inf and check_finite skipping without a write. bfloat16 params kept
by int16 remainders or rounded stochastically (every such storage): the codecs against the
oracle's, every kernel against the fp32-master kernel on the same data and against Numba.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuda_harness
from cuda_harness import KEEPING, SEED, MultiCase, bits, keeping_tables, scalars_for
from fastradam import reference
from fastradam.flavours import PRESETS
from fastradam.layout import FlatLayout
from fastradam.rounding import round_key
from fastradam.scalars import pack_rows, scalar_rows
from fastradam.options import check_group
from fastradam.storage import SUPPORTED, Storage
from oracle_check import assert_matches_oracle
from tests.cases import NUMPY_DTYPES as DTYPES, STORAGES
from test_cuda_host import backend, harness, numba_backend  # noqa: F401  (shared fixtures)

pytestmark = pytest.mark.skipif(cuda_harness.compiler() is None, reason="no host C++ compiler (g++ or $CXX)")

COMBOS = [(DTYPES[s.params], DTYPES[s.grads], DTYPES[s.moments], s.master) for s in STORAGES]
IDS = [s.short for s in STORAGES]
SIXTEEN = [(c, i) for c, i in zip(COMBOS, IDS) if c[0].itemsize == 2 or c[2].itemsize == 2]


# --- Conversions -----------------------------------------------------------------------------

ALL_16_BIT = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@pytest.mark.parametrize("name,dtype", [("bfloat16_to_float", DTYPES["bfloat16"]),
                                        ("float16_to_float", DTYPES["float16"])])
def test_widening_every_16_bit_pattern_is_exact(harness, name, dtype):
    got = harness.convert(name, ALL_16_BIT)
    want = ALL_16_BIT.view(dtype).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))  # NaN payloads included


def narrowing_inputs() -> np.ndarray:
    """Random float32 bit patterns (every exponent: NaN, inf, subnormals), values near the 16-bit
    rounding ties and overflow thresholds, and the specials."""
    rng = np.random.default_rng(2024)
    uniform = rng.integers(0, 1 << 32, size=2_000_000, dtype=np.uint64).astype(np.uint32)
    # ties and their neighbours: 16-bit values with the dropped bits exactly half, +-1
    base = rng.integers(0, 1 << 16, size=200_000, dtype=np.uint32) << 16
    ties = np.concatenate([base | 0x8000, base | 0x7FFF, base | 0x8001, (base >> 3) | 0x1000,
                           (base >> 3) | 0x0FFF, (base >> 3) | 0x1001])
    small = (rng.standard_normal(500_000) * 2.0 ** rng.integers(-30, 17, 500_000)).astype(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65504.0, 65519.99, 65520.0, -65520.0,
                         2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-26, 2.0**-14, 2.0**-14 * (1 - 2.0**-11),
                         3.3895314e38, 3.4028235e38, 1e-45, -1e-45, 1.1754942e-38], dtype=np.float32)
    signalling = np.array([0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FC00001, 0x7F802001, 0xFFFFFFFF],
                          dtype=np.uint32).view(np.float32)
    return np.concatenate([uniform.view(np.float32), ties.view(np.float32), small, specials, signalling])


@pytest.mark.parametrize("name,dtype", [("float_to_bfloat16", DTYPES["bfloat16"]),
                                        ("float_to_float16", DTYPES["float16"])])
def test_narrowing_rounds_like_astype_bit_for_bit(harness, name, dtype):
    values = narrowing_inputs()
    got = harness.convert(name, values)
    with np.errstate(all="ignore"):
        want = values.astype(dtype).view(np.uint16)
    mismatch = np.flatnonzero(got != want)
    assert mismatch.size == 0, [(hex(values.view(np.uint32)[i]), hex(got[i]), hex(want[i])) for i in mismatch[:5]]


def test_narrowing_keeps_nan_sign_and_quietness_and_overflows_to_inf(harness):
    values = np.array([np.nan, -np.nan, np.inf, -np.inf, 65520.0, 3.0e38, -1e5], dtype=np.float32)
    bf16 = harness.convert("float_to_bfloat16", values)
    f16 = harness.convert("float_to_float16", values)
    assert bf16[0] == 0x7FC0 and bf16[1] == 0xFFC0  # quiet NaN, sign kept
    assert f16[0] & 0x7E00 == 0x7E00 and f16[1] & 0x8000  # quiet bit kept, sign kept
    assert list(bf16[2:4]) == [0x7F80, 0xFF80] and list(f16[2:4]) == [0x7C00, 0xFC00]
    assert list(f16[4:7]) == [0x7C00, 0x7C00, 0xFC00]  # 65520 ties up to inf; beyond overflows


# --- Buffers ------------------------------------------------------------------------------------


def aligned(values: np.ndarray, dtype: np.dtype, offset: int) -> np.ndarray:
    """``values`` as ``dtype`` in a view ``offset`` elements past a 64-byte boundary (NaN around)."""
    n = values.size
    storage = np.empty((n + offset + 8) * dtype.itemsize + 64, dtype=np.uint8)
    start = -storage.ctypes.data % 64
    raw = storage[start:start + (n + offset + 8) * dtype.itemsize].view(dtype)
    raw[...] = np.nan
    view = raw[offset:offset + n]
    view[...] = values.astype(dtype)
    return view


def stored(combo, n: int, seed: int, offset: int = 0) -> tuple[tuple, np.ndarray | None]:
    """Random (p, g, m, v) in the combination's storage, and the fp32 master (the params' values)."""
    params, grads, moments, master = combo
    rng = np.random.default_rng([seed, n])
    values = (rng.standard_normal(n), rng.standard_normal(n), 0.1 * rng.standard_normal(n),
              1e-6 + 1e-2 * rng.random(n))
    buffers = tuple(aligned(x, d, offset) for x, d in zip(values, (params, grads, moments, moments)))
    return buffers, (aligned(buffers[0].astype(np.float64), np.dtype(np.float32), offset) if master else None)


def hyper(step: int, **options) -> dict:
    return dict(step=step, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                maximize=False, flavour=PRESETS["torch"]) | options


HYPERS = (hyper(3), hyper(10, weight_decay=0.1),
          hyper(40, weight_decay=0.1, decoupled_weight_decay=True, maximize=True, flavour=PRESETS["optax"]))


def check_step(before: tuple, buffers: tuple, master, master_before, h: dict) -> None:
    """The new params (the master when there is one), exp_avg and exp_avg_sq match the oracle within
    one storage ULP; the grads are untouched; 16-bit params are the master rounded, bit for bit."""
    params_before = before[0] if master is None else master_before
    new_params = buffers[0] if master is None else master
    assert_matches_oracle((params_before, *before[1:]), (new_params, buffers[2], buffers[3]), h)
    np.testing.assert_array_equal(bits(buffers[1]), bits(before[1]))
    if master is not None:
        assert buffers[0].tobytes() == master.astype(buffers[0].dtype).tobytes()


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
@pytest.mark.parametrize("n", (0, 1, 3, 17, 1023, 4099))
@pytest.mark.parametrize("offset", (0, 1, 3))
@pytest.mark.parametrize("h", HYPERS, ids=("plain", "l2", "decoupled-maximize-optax"))
def test_flat_kernel_matches_the_oracle_for_every_storage(harness, combo, n, offset, h):
    buffers, master = stored(combo, n, seed=offset, offset=offset)
    before = tuple(b.copy() for b in buffers)
    master_before = None if master is None else master.copy()
    harness.step(buffers, *pack_rows([scalars_for(h)], cuda_harness.math_dtype(buffers[0])), grid=3, block=64,
                 master=master)
    check_step(before, buffers, master, master_before, h)


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
@pytest.mark.parametrize("offsets", ((0, 0, 0, 0), (5, 5, 5, 5), (0, 1, 0, 0)), ids=("aligned", "coaligned", "mixed"))
def test_pack_path_for_every_storage(harness, combo, offsets):
    """Packs of 16 bytes of the narrowest role wherever every buffer can be 16-byte aligned at one
    element; every element scalar otherwise."""
    n = 4099
    params, grads, moments, want_master = combo
    rng = np.random.default_rng(1)
    values = [rng.standard_normal(n) for _ in range(3)] + [rng.random(n)]
    buffers = tuple(aligned(x, d, o) for x, d, o in zip(values, (params, grads, moments, moments), offsets))
    master = aligned(values[0], np.dtype(np.float32), offsets[0]) if want_master else None
    harness.step(buffers, *pack_rows([scalars_for(hyper(5))], cuda_harness.math_dtype(buffers[0])), grid=5,
                 block=64, master=master)
    vector, scalar = harness.counts()
    assert vector + scalar == n
    lanes = 16 // min(params.itemsize, grads.itemsize, moments.itemsize)
    byte_offsets = {(o * d.itemsize) % 16 for o, d in zip(offsets, (params, grads, moments, moments))}
    if master is not None:
        byte_offsets.add(offsets[0] * 4 % 16)
    head = next((h for h in range(lanes) if all((o + h) * d.itemsize % 16 == 0 for o, d in
                                                zip(offsets, (params, grads, moments, moments))) and
                 (master is None or (offsets[0] + h) * 4 % 16 == 0)), None)
    if head is None:
        assert (vector, scalar) == (0, n)
    else:
        assert scalar == head + (n - head) % lanes and vector > 0


@pytest.mark.parametrize("combo,combo_id", SIXTEEN, ids=[i for _, i in SIXTEEN])
@pytest.mark.parametrize("step", (3, 10))
def test_16_bit_results_are_the_float32_results_rounded_bit_for_bit(harness, combo, combo_id, step):
    buffers, master = stored(combo, 4099, seed=step)
    specials = np.array([0.0, -0.0, 1e-30, -1e-30, 3e-5, 65504.0])
    buffers[0][:6] = specials.astype(combo[0])
    if master is not None:
        master[:6] = specials.astype(np.float32)
    wide = [b.astype(np.float32) for b in buffers]
    if master is not None:
        wide[0] = master.copy()
    floats, ints = pack_rows([scalars_for(hyper(step, weight_decay=0.1))], np.float32)
    harness.step(tuple(wide), floats, ints, grid=3, block=64)
    harness.step(buffers, floats, ints, grid=3, block=64, master=master)
    for narrow, full in ((buffers[0], wide[0]), (buffers[2], wide[2]), (buffers[3], wide[3])):
        assert narrow.tobytes() == full.astype(narrow.dtype).tobytes()
    if master is not None:
        assert master.tobytes() == wide[0].tobytes()


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_flat_kernel_rounds_like_the_numba_backend(harness, numba_backend, combo):
    ours, master = stored(combo, 5003, seed=7, offset=1)
    theirs = tuple(np.array(b) for b in ours)
    their_master = None if master is None else np.array(master)
    floats, ints = pack_rows([scalars_for(hyper(9, weight_decay=0.05))], cuda_harness.math_dtype(ours[0]), 4.0)
    harness.step(ours, floats, ints, grid=7, block=32, master=master)
    numba_backend.bind_flat(*(numba_backend.as_array(b) for b in theirs), master=their_master)(floats, ints)
    for got, want in zip(ours, theirs):
        np.testing.assert_array_equal(bits(got), bits(want))
    if master is not None:
        np.testing.assert_array_equal(bits(master), bits(their_master))


# --- Grad scaling -------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_power_of_two_grad_scale_is_exact(harness, combo):
    buffers, master = stored(combo, 1000, seed=1)
    scaled = tuple(b.copy() for b in buffers)
    scaled_master = None if master is None else master.copy()
    scaled[1][...] = (buffers[1].astype(np.float64) * 1024).astype(buffers[1].dtype)
    math = cuda_harness.math_dtype(buffers[0])
    rows = [scalars_for(hyper(9, weight_decay=0.01))]
    harness.step(buffers, *pack_rows(rows, math), grid=3, block=64, master=master)
    harness.step(scaled, *pack_rows(rows, math, 1024.0), grid=3, block=64, master=scaled_master)
    for k in (0, 2, 3):
        assert buffers[k].tobytes() == scaled[k].tobytes()
    if master is not None:
        assert master.tobytes() == scaled_master.tobytes()


def test_any_grad_scale_unscales_inside_the_kernel(harness):
    buffers, _ = stored(COMBOS[0], 1000, seed=2)
    scale = 3000.0
    buffers[1][...] = (buffers[1].astype(np.float64) * scale).astype(np.float32)
    before = (buffers[0].copy(), buffers[1].astype(np.float64) / scale, buffers[2].copy(), buffers[3].copy())
    harness.step(buffers, *pack_rows([scalars_for(hyper(9))], np.float32, scale), grid=3, block=64)
    assert_matches_oracle(before, (buffers[0], buffers[2], buffers[3]), hyper(9))


# --- found_inf and check_finite -------------------------------------------------------------------

FLAGS = (np.array(True), np.array(1, np.int32), np.array(1.0, np.float32), np.array(np.nan, np.float32),
         np.array(7, np.int64), np.array(-1.0, np.float64))


def snapshot(*arrays) -> list[bytes]:
    return [a.tobytes() for a in arrays if a is not None]


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f"{f.dtype}-{f}")
def test_found_inf_skips_every_kernel_without_a_write(harness, combo, flag):
    buffers, master = stored(combo, 4099, seed=3)
    before = snapshot(*buffers, master)
    h = hyper(5, weight_decay=0.1)
    math = cuda_harness.math_dtype(buffers[0])
    floats, ints = pack_rows([scalars_for(h)], math)
    harness.step(buffers, floats, ints, grid=3, block=64, master=master, found_inf=flag)
    harness.step(buffers, floats, ints, grid=3, block=64, master=master, found_inf=flag, check_finite=True)
    layout = FlatLayout([(4099,)])
    harness.step_segments(buffers, layout.arrays, np.zeros(1, np.int32), floats, ints, 3, 64, master=master,
                          found_inf=flag)
    harness.step_tensors([(*buffers, *(() if master is None else (master,)))], np.zeros(1, np.int32), floats, ints,
                         3, 64, found_inf=flag)
    harness.step_capturable(buffers, np.array(5, np.int64), 1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=0.1, decoupled_weight_decay=False, maximize=False, grid=3, block=64,
                            master=master, found_inf=flag)
    assert snapshot(*buffers, master) == before
    assert harness.counts() == (0, 0)


@pytest.mark.parametrize("flag", (np.array(False), np.array(0, np.int32), np.array(-0.0, np.float32)), ids=str)
def test_a_clear_found_inf_steps(harness, flag):
    buffers, _ = stored(COMBOS[1], 100, seed=4)
    twin = tuple(b.copy() for b in buffers)
    floats, ints = pack_rows([scalars_for(hyper(5))], np.float32)
    harness.step(buffers, floats, ints, grid=3, block=64, found_inf=flag)
    harness.step(twin, floats, ints, grid=3, block=64)
    assert snapshot(*buffers) == snapshot(*twin) and snapshot(*buffers) != snapshot(*stored(COMBOS[1], 100, 4)[0])


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
@pytest.mark.parametrize("bad", (np.nan, np.inf, -np.inf))
@pytest.mark.parametrize("where", (0, 69999))
def test_check_finite_skips_a_step_with_non_finite_gradients(harness, combo, bad, where):
    buffers, master = stored(combo, 70000, seed=5, offset=1)
    buffers[1][where] = bad
    before = snapshot(*buffers, master)
    floats, ints = pack_rows([scalars_for(hyper(7))], cuda_harness.math_dtype(buffers[0]))
    harness.step(buffers, floats, ints, grid=40, block=64, master=master, check_finite=True)
    assert snapshot(*buffers, master) == before
    harness.step_capturable(buffers, np.array(7, np.int32), np.array(1e-2, np.float32), beta1=0.9, beta2=0.999,
                            eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, maximize=False, grid=40,
                            block=64, master=master, check_finite=True)
    assert snapshot(*buffers, master) == before
    buffers[1][where] = 0.5
    expected = tuple(b.copy() for b in buffers)
    expected_master = None if master is None else master.copy()
    harness.step(expected, floats, ints, grid=40, block=64, master=expected_master)
    harness.step(buffers, floats, ints, grid=40, block=64, master=master, check_finite=True)
    assert snapshot(*buffers, master) == snapshot(*expected, expected_master)


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_check_finite_on_segments_reads_only_active_segments(harness, combo):
    params, grads, moments, want_master = combo
    layout = FlatLayout([(100,), (100,), (100,)])
    flats = [layout.pack([np.full(100, 0.5)] * 3).astype(d) for d in (params, grads, moments, moments)]
    master = layout.pack([np.full(100, 0.5)] * 3).astype(np.float32) if want_master else None
    flats[1][100:128] = np.nan  # padding: never read
    flats[1][128 + 5] = np.nan  # segment 1, inactive this step
    before = snapshot(*flats, master)
    floats, ints = pack_rows([scalars_for(hyper(3))], cuda_harness.math_dtype(flats[0]))
    harness.step_segments(tuple(flats), layout.arrays, np.array([0, -1, 0], np.int32), floats, ints, 3, 64,
                          master=master, check_finite=True)
    changed = flats[0][:100] if master is None else master[:100]
    assert changed.tobytes() != before[0 if master is None else 4][:100 * changed.itemsize]
    flats = [np.frombuffer(b, dtype=f.dtype).copy() for b, f in zip(before, flats)]
    master = None if master is None else np.frombuffer(before[4], dtype=np.float32).copy()
    harness.step_segments(tuple(flats), layout.arrays, np.array([0, 0, 0], np.int32), floats, ints, 3, 64,
                          master=master, check_finite=True)
    assert snapshot(*flats, master) == before


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_check_finite_on_tensor_lists_reads_only_active_tensors(harness, combo):
    tensors = []
    for n in (5, 300, 4100):
        buffers, master = stored(combo, n, seed=n, offset=n % 3)
        tensors.append((*buffers, *(() if master is None else (master,))))
    tensors[1][1][7] = np.inf
    before = [snapshot(*t) for t in tensors]
    floats, ints = pack_rows([scalars_for(hyper(2))], cuda_harness.math_dtype(tensors[0][0]))
    harness.step_tensors(tensors, np.array([0, 0, 0], np.int32), floats, ints, 3, 64, check_finite=True)
    assert [snapshot(*t) for t in tensors] == before
    harness.step_tensors(tensors, np.array([0, -1, 0], np.int32), floats, ints, 3, 64, check_finite=True)
    after = [snapshot(*t) for t in tensors]
    assert after[1] == before[1] and after[0] != before[0] and after[2] != before[2]


# --- Multi-tensor and capturable kernels, every storage ---------------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
@pytest.mark.parametrize("base", (0, 1), ids=("aligned", "coaligned"))
def test_segments_kernel_matches_the_oracle_for_every_storage(harness, combo, base):
    case = MultiCase(PRESETS["torch"])
    layout = case.layout()
    values = case.flat_values(layout)
    params, grads, moments, want_master = combo
    flats = tuple(aligned(np.nan_to_num(x, nan=0.25), d, base) for x, d in zip(values, (params, grads, moments, moments)))
    master = aligned(flats[0].astype(np.float64), np.dtype(np.float32), base) if want_master else None
    before = tuple(f.copy() for f in flats)
    master_before = None if master is None else master.copy()
    floats, ints = pack_rows(case.rows, cuda_harness.math_dtype(flats[0]))
    harness.step_segments(flats, layout.arrays, case.index_row, floats, ints, 1056, 256, master=master)
    untouched = np.ones(layout.size, dtype=bool)
    for i, segment in enumerate(layout.segments):
        if case.index_row[i] < 0:
            continue
        part = slice(segment.offset, segment.offset + segment.size)
        untouched[part] = False
        check_step(tuple(b[part] for b in before), tuple(f[part] for f in flats),
                   None if master is None else master[part], None if master is None else master_before[part],
                   case.hyper(i))
    for got, want in zip((*flats, master), (*before, master_before)):
        if got is not None:
            np.testing.assert_array_equal(bits(got[untouched]), bits(want[untouched]))


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_tensors_kernel_matches_the_oracle_for_every_storage(harness, combo):
    case = MultiCase(PRESETS["torch"])
    tensors, befores = [], []
    for i, n in enumerate(case.sizes):
        buffers, master = stored(combo, n, seed=i, offset=i % 3)
        tensors.append((*buffers, *(() if master is None else (master,))))
        befores.append(tuple(b.copy() for b in tensors[-1]))
    floats, ints = pack_rows(case.rows, cuda_harness.math_dtype(tensors[0][0]))
    harness.step_tensors(tensors, case.index_row, floats, ints, 1056, 256)
    for i, (tensor, before) in enumerate(zip(tensors, befores)):
        master = tensor[4] if len(tensor) == 5 else None
        if case.index_row[i] >= 0:
            check_step(before[:4], tensor[:4], master, None if master is None else before[4], case.hyper(i))
        else:
            assert snapshot(*tensor) == snapshot(*before)


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
@pytest.mark.parametrize("step", (3, 1000))
def test_capturable_kernel_equals_the_flat_kernel_for_every_storage(harness, combo, step):
    buffers, master = stored(combo, 1023, seed=step, offset=2)
    twin = tuple(b.copy() for b in buffers)
    twin_master = None if master is None else master.copy()
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02, decoupled_weight_decay=True, maximize=True)
    harness.step_capturable(buffers, np.array(step, np.int64), np.array(2e-3, np.float64), grid=3, block=64,
                            master=master, grad_scale=8.0, **options)
    h = hyper(step, lr=2e-3, weight_decay=0.02, decoupled_weight_decay=True, maximize=True)
    harness.step(twin, *pack_rows([scalars_for(h)], cuda_harness.math_dtype(twin[0]), 8.0), grid=3, block=64,
                 master=twin_master)
    assert snapshot(*buffers, master) == snapshot(*twin, twin_master)


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
@pytest.mark.parametrize("steps_dtype", (np.float32, np.int64), ids=("float32-steps", "int64-steps"))
@pytest.mark.parametrize("lr_kind", ("float", "array"))
def test_capturable_segments_kernel_equals_the_segments_kernel(harness, combo, steps_dtype, lr_kind):
    check_capturable_segments(harness, combo, PRESETS["torch"], steps_dtype, lr_kind)


@pytest.mark.parametrize("flavour", tuple(PRESETS.values()), ids=lambda f: f.name)
def test_capturable_segments_kernel_follows_every_flavour(harness, flavour):
    check_capturable_segments(harness, COMBOS[0], flavour, np.float32, "array")


def check_capturable_segments(harness, combo, flavour, steps_dtype, lr_kind) -> None:
    """One capturable launch (step counts per segment and group rows read by the kernel) writes
    exactly the bits of the host-scalar segments launch; skipped segments and padding untouched."""
    case = MultiCase(flavour)
    layout = case.layout()
    params, grads, moments, want_master = combo
    flats = tuple(aligned(np.nan_to_num(x, nan=0.25), d, 1)
                  for x, d in zip(case.flat_values(layout), (params, grads, moments, moments)))
    master = aligned(flats[0].astype(np.float64), np.dtype(np.float32), 1) if want_master else None
    twin, twin_master = tuple(f.copy() for f in flats), None if master is None else master.copy()
    before = snapshot(flats[0])
    groups = [check_group({k: v for k, v in h.items() if k != "step"}) for h in case.hypers]
    # per-segment counts that differ inside a group (group 0 crosses the threshold at 5 or 6)
    steps = np.array([case.hypers[g]["step"] + i % 3 for i, g in enumerate(case.groups)], dtype=steps_dtype)
    active = ~case.skipped
    rows, segment_row = scalar_rows(groups, case.groups, steps.astype(np.int64), active)
    harness.step_segments(twin, layout.arrays, segment_row,
                          *pack_rows(rows, cuda_harness.math_dtype(twin[0]), 4.0), 1056, 256, master=twin_master)
    lrs = [h["lr"] if lr_kind == "float" else np.array(h["lr"], np.float64) for h in case.hypers]
    harness.step_segments_capturable(flats, layout.arrays, np.where(active, case.groups, -1), steps, groups, lrs,
                                     1056, 256, master=master, grad_scale=4.0)
    assert snapshot(*flats, master) == snapshot(*twin, twin_master)
    assert snapshot(flats[0]) != before  # both stepped: the equality above is not of two untouched copies


def test_backend_lanes_and_math_dtype_follow_the_storage(backend):
    from fastradam.backends.cuda.module import lanes

    storage = {(s.params, s.grads, s.moments, s.master): s for s in backend.STORAGE_COMBINATIONS}
    assert set(STORAGES) <= set(backend.STORAGE_COMBINATIONS)
    assert lanes(storage["bfloat16", "bfloat16", "float32", True]) == 8
    assert lanes(storage["float32", "float32", "float32", False]) == 4
    assert lanes(storage["float64", "float64", "float64", False]) == 2
    assert storage["float64", "float64", "float64", False].math_dtype == np.float64
    assert storage["float16", "bfloat16", "bfloat16", True].math_dtype == np.float32


# --- How bfloat16 params keep their values: remainders and stochastic rounding ------------------------

KEEPING_IDS = [s.short for s in KEEPING]
#: The storages the segments and tensor-list kernels are compared with Numba in: all-fp32 and
#: all-bf16 grads and moments (each tensor-list storage is one more Numba compilation of 6-25 s on
#: CI's cold cache; every storage's codec runs through the flat tests).
MULTI_TENSOR_KEEPING = [s for s in KEEPING if s.grads == s.moments]


def master_twin(storage: Storage) -> Storage:
    """The fp32-master storage of the same formats: its master is what the remainders hold, and the
    result that stochastic rounding rounds."""
    return Storage(storage.params, storage.grads, storage.moments, master=True)


def kept(storage: Storage, n: int, seed: int, offset: int = 0) -> tuple[tuple, np.ndarray | None, np.ndarray]:
    """Random (p, g, m, v) of ``storage``, its side buffer (the int16 remainders, or None) and the
    fp32 master they stand for (with remainders: p and the remainders joined; else p widened)."""
    rng = np.random.default_rng([seed, n, offset])
    master = aligned(rng.standard_normal(n) * 2.0 ** rng.integers(-8, 8, n), np.dtype(np.float32), offset)
    values = (master, rng.standard_normal(n), 0.1 * rng.standard_normal(n), 1e-6 + 1e-2 * rng.random(n))
    dtypes = (DTYPES[storage.params], DTYPES[storage.grads], DTYPES[storage.moments], DTYPES[storage.moments])
    buffers = tuple(aligned(x.astype(np.float64), d, offset) for x, d in zip(values, dtypes))
    if not storage.remainders:
        return buffers, None, aligned(buffers[0].astype(np.float64), np.dtype(np.float32), offset)
    high, low = reference.split_master(master)
    buffers[0].view(np.uint16)[...] = high
    side = aligned(np.zeros(n), np.dtype(np.float16), offset).view(np.int16)  # float16 NaN bits around it
    side[...] = low
    return buffers, side, master


def twin_of(buffers: tuple, master: np.ndarray) -> tuple[tuple, np.ndarray]:
    """Copies of ``buffers`` and of the fp32 ``master`` for the fp32-master path."""
    return tuple(b.copy() for b in buffers), master.copy()


def check_kept(storage: Storage, buffers: tuple, side: np.ndarray | None, twin: tuple, twin_master: np.ndarray,
               grads_before: np.ndarray, index: np.ndarray, step: int, where=slice(None)) -> None:
    """``buffers[where]`` (and ``side``) after a step against the fp32-master path's ``twin`` on the same
    data: the moments bit for bit; with remainders, params and remainders the split of its master (and
    they join back to it); stochastically, params its result rounded with the bits of ``index``."""
    result = twin_master[where]
    for k in (2, 3):
        np.testing.assert_array_equal(bits(buffers[k][where]), bits(twin[k][where]))
    np.testing.assert_array_equal(bits(buffers[1]), bits(grads_before))
    got = buffers[0][where].view(np.uint16)
    if storage.remainders:
        high, low = reference.split_master(result)
        np.testing.assert_array_equal(got, high)
        np.testing.assert_array_equal(side[where], low)
        np.testing.assert_array_equal(bits(reference.join_master(got, side[where])), bits(result))
    else:
        want = reference.stochastic_round_bfloat16(result, reference.stochastic_round_bits(SEED, step, index))
        np.testing.assert_array_equal(got, want)


def test_every_new_storage_is_checked_here():
    assert len(KEEPING) == 12 and all(master_twin(s) in SUPPORTED for s in KEEPING)
    assert sorted(s.short.rsplit("_", 1)[1] for s in KEEPING) == ["rem"] * 6 + ["sr"] * 6


def test_remainder_codec_is_the_oracles_bit_for_bit(harness):
    values = narrowing_inputs()
    high, low = harness.split_remainders(values)
    want_high, want_low = reference.split_master(values)
    np.testing.assert_array_equal(high, want_high)
    np.testing.assert_array_equal(low, want_low)
    joined = harness.join_remainders(high, low)
    finite = ~np.isnan(values)
    np.testing.assert_array_equal(bits(joined[finite]), bits(values[finite]))  # exact for every non-NaN
    assert np.isnan(joined[~finite]).all()
    np.testing.assert_array_equal(bits(joined), bits(reference.join_master(want_high, want_low)))


def test_stochastic_rounding_codec_is_the_oracles_bit_for_bit(harness):
    values = narrowing_inputs()[::3]
    rng = np.random.default_rng(5)
    index = rng.integers(0, 1 << 40, values.size, dtype=np.int64)
    index[:4] = (0, 1, (1 << 32) - 1, 1 << 32)
    for seed, step in ((SEED, 1), (0, 7), ((1 << 64) - 1, 123456)):
        got = harness.stochastic_round(values, index, round_key(seed, step))
        want = reference.stochastic_round_bfloat16(values, reference.stochastic_round_bits(seed, step, index))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("storage", KEEPING, ids=KEEPING_IDS)
@pytest.mark.parametrize("n", (1, 17, 4099))
@pytest.mark.parametrize("offset", (0, 1))
@pytest.mark.parametrize("h", HYPERS[1:], ids=("l2", "decoupled-maximize-optax"))
def test_flat_kernel_keeps_params_as_the_fp32_master_path(harness, storage, n, offset, h):
    """Two steps (the second reads what the first wrote) through the pack path (aligned) and the
    scalar path (odd offsets: bfloat16 beside float32 roles), against the fp32-master kernel."""
    buffers, side, master = kept(storage, n, seed=3, offset=offset)
    twin, twin_master = twin_of(buffers, master)
    for step in (h["step"], h["step"] + 1):
        floats, ints = keeping_tables([(scalars_for(dict(h, step=step)), step)], storage)
        grads = buffers[1].copy()
        harness.step(twin, floats, ints, grid=3, block=64, master=twin_master)
        harness.step(buffers, floats, ints, grid=3, block=64, master=side, stochastic=storage.stochastic)
        check_kept(storage, buffers, side, twin, twin_master, grads, np.arange(n), step)
        if storage.stochastic:  # the twin goes on from the same bfloat16 params
            twin[0][...], twin_master[...] = buffers[0], buffers[0].astype(np.float32)


@pytest.mark.parametrize("storage", KEEPING, ids=KEEPING_IDS)
def test_flat_kernel_keeps_params_as_the_numba_backend(harness, numba_backend, storage):
    ours, side, _ = kept(storage, 5003, seed=7, offset=1)
    theirs, their_side = tuple(b.copy() for b in ours), None if side is None else side.copy()
    floats, ints = keeping_tables([(scalars_for(hyper(9, weight_decay=0.05)), 9)], storage)
    harness.step(ours, floats, ints, grid=7, block=32, master=side, stochastic=storage.stochastic)
    numba_backend.bind_flat(*(numba_backend.as_array(b) for b in theirs), master=their_side,
                            stochastic=storage.stochastic)(floats, ints)
    for got, want in zip((*ours, side), (*theirs, their_side)):
        if got is not None:
            np.testing.assert_array_equal(bits(got), bits(want))


def keeping_rows(case: MultiCase, storage: Storage) -> tuple[np.ndarray, np.ndarray]:
    """The case's tables, with each row's stochastic-rounding key (rows: group 1, the decoy, group 0)."""
    steps = (case.hypers[1]["step"], 1000, case.hypers[0]["step"])
    return keeping_tables(list(zip(case.rows, steps)), storage)


@pytest.mark.parametrize("storage", MULTI_TENSOR_KEEPING, ids=lambda s: s.short)
def test_segments_kernel_keeps_params_as_the_fp32_master_path_and_numba(harness, numba_backend, storage):
    """A padded layout of ~50 segments in two groups, some skipped: each active segment against the
    fp32-master kernel (stochastically with the global index: the segments' elements in order, the
    padding not counted), skipped segments and the padding untouched, all bit for bit as Numba."""
    case = MultiCase(PRESETS["torch"])
    layout = case.layout()
    buffers, side, master = kept(storage, layout.size, seed=11, offset=1)
    twin, twin_master = twin_of(buffers, master)
    theirs, their_side = tuple(b.copy() for b in buffers), None if side is None else side.copy()
    before = tuple(b.copy() for b in (*buffers, *(() if side is None else (side,))))
    floats, ints = keeping_rows(case, storage)
    harness.step_segments(twin, layout.arrays, case.index_row, floats, ints, 1056, 256, master=twin_master)
    harness.step_segments(buffers, layout.arrays, case.index_row, floats, ints, 1056, 256, master=side,
                          stochastic=storage.stochastic)
    numba_backend.bind_segments(*(numba_backend.as_array(b) for b in theirs), layout.arrays, master=their_side,
                                stochastic=storage.stochastic)(case.index_row, floats, ints)
    untouched = np.ones(layout.size, dtype=bool)
    first = 0
    for i, segment in enumerate(layout.segments):
        where = slice(segment.offset, segment.offset + segment.size)
        if case.index_row[i] >= 0:
            untouched[where] = False
            step = case.hyper(i)["step"]
            check_kept(storage, buffers, side, twin, twin_master, before[1], first + np.arange(segment.size), step,
                       where)
        first += segment.size
    for got, want in zip((*buffers, *(() if side is None else (side,))), before):
        np.testing.assert_array_equal(bits(got[untouched]), bits(want[untouched]))
    for got, want in zip((*buffers, side), (*theirs, their_side)):
        if got is not None:
            np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize("storage", MULTI_TENSOR_KEEPING, ids=lambda s: s.short)
def test_tensors_kernel_keeps_params_as_the_fp32_master_path_and_numba(harness, numba_backend, storage):
    """~50 separate tensors (odd sizes and offsets, empty ones, some skipped): each active tensor against
    the fp32-master kernel (stochastically with the global index: the tensors' elements in list order),
    skipped ones untouched, all bit for bit as Numba."""
    case = MultiCase(PRESETS["torch"])
    ours, twins, theirs, befores = [], [], [], []
    for i, n in enumerate(case.sizes):
        buffers, side, master = kept(storage, n, seed=i, offset=i % 3)
        ours.append((*buffers, *(() if side is None else (side,))))
        twins.append((*twin_of(buffers, master)[0], master.copy()))
        theirs.append(tuple(b.copy() for b in ours[-1]))
        befores.append(tuple(b.copy() for b in ours[-1]))
    floats, ints = keeping_rows(case, storage)
    harness.step_tensors(twins, case.index_row, floats, ints, 1056, 256)
    harness.step_tensors(ours, case.index_row, floats, ints, 1056, 256, stochastic=storage.stochastic)
    views = [[numba_backend.as_array(t[k]) for t in theirs] for k in range(len(theirs[0]))]
    numba_backend.bind_tensors(*views[:4], master=views[4] if storage.remainders else None,
                               stochastic=storage.stochastic)(case.index_row, floats, ints)
    firsts = np.cumsum(case.sizes) - np.array(case.sizes)
    for i, (tensor, twin, before, their) in enumerate(zip(ours, twins, befores, theirs)):
        if case.index_row[i] >= 0:
            check_kept(storage, tensor[:4], tensor[4] if storage.remainders else None, twin[:4], twin[4], before[1],
                       firsts[i] + np.arange(case.sizes[i]), case.hyper(i)["step"])
        else:
            assert snapshot(*tensor) == snapshot(*before)
        assert snapshot(*tensor) == snapshot(*their)


REMAINDERS = tuple(s for s in KEEPING if s.remainders)


@pytest.mark.parametrize("storage", REMAINDERS, ids=[s.short for s in REMAINDERS])
def test_capturable_kernels_keep_remainders_as_the_host_scalar_kernels(harness, storage):
    """Remainders need no host key: the capturable kernels take them (flat and segments), writing the
    bits of the host-scalar kernels."""
    buffers, side, _ = kept(storage, 1023, seed=2, offset=2)
    twin, twin_side = tuple(b.copy() for b in buffers), side.copy()
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02, decoupled_weight_decay=True, maximize=True)
    harness.step_capturable(buffers, np.array(40, np.int64), np.array(2e-3, np.float64), grid=3, block=64,
                            master=side, grad_scale=8.0, **options)
    h = hyper(40, lr=2e-3, weight_decay=0.02, decoupled_weight_decay=True, maximize=True)
    harness.step(twin, *pack_rows([scalars_for(h)], np.float32, 8.0), grid=3, block=64, master=twin_side)
    assert snapshot(*buffers, side) == snapshot(*twin, twin_side)
    assert snapshot(side) != snapshot(kept(storage, 1023, seed=2, offset=2)[1])  # both stepped

    case = MultiCase(PRESETS["torch"])
    layout = case.layout()
    flats, side, _ = kept(storage, layout.size, seed=4, offset=1)
    twin, twin_side = tuple(f.copy() for f in flats), side.copy()
    groups = [check_group({k: v for k, v in h.items() if k != "step"}) for h in case.hypers]
    steps = np.array([case.hypers[g]["step"] for g in case.groups], dtype=np.int64)
    rows, segment_row = scalar_rows(groups, case.groups, steps, ~case.skipped)
    harness.step_segments(twin, layout.arrays, segment_row, *pack_rows(rows, np.float32), 1056, 256,
                          master=twin_side)
    harness.step_segments_capturable(flats, layout.arrays, np.where(case.skipped, -1, case.groups), steps, groups,
                                     [h["lr"] for h in case.hypers], 1056, 256, master=side)
    assert snapshot(*flats, side) == snapshot(*twin, twin_side)


@pytest.mark.parametrize("storage", KEEPING, ids=KEEPING_IDS)
def test_found_inf_and_check_finite_skip_a_kept_step_without_a_write(harness, storage):
    buffers, side, _ = kept(storage, 4099, seed=3)
    buffers[1][4000] = np.inf
    before = snapshot(*buffers, side)
    floats, ints = keeping_tables([(scalars_for(hyper(5, weight_decay=0.1)), 5)], storage)
    keywords = dict(master=side, stochastic=storage.stochastic)
    harness.step(buffers, floats, ints, grid=3, block=64, found_inf=np.array(True), **keywords)
    harness.step(buffers, floats, ints, grid=3, block=64, check_finite=True, **keywords)
    layout = FlatLayout([(4099,)])
    harness.step_segments(buffers, layout.arrays, np.zeros(1, np.int32), floats, ints, 3, 64, check_finite=True,
                          **keywords)
    harness.step_tensors([(*buffers, *(() if side is None else (side,)))], np.zeros(1, np.int32), floats, ints, 3,
                         64, stochastic=storage.stochastic, found_inf=np.array(1.0, np.float32))
    assert snapshot(*buffers, side) == before


def test_the_backend_refuses_stochastic_rounding_in_capturable_steps(backend):
    group = check_group({})
    with pytest.raises(ValueError, match="stochastic rounding has no capturable kernels"):
        backend.radam_step_capturable(None, None, None, None, None, 1e-3, group, stochastic=True)
    with pytest.raises(ValueError, match="stochastic rounding has no capturable kernels"):
        backend.radam_step_segments_capturable(None, None, None, None, None, None, None, [group], [1e-3],
                                               stochastic=True)


def test_index_shifts_count_the_pieces_in_order_without_padding(backend):
    layout = FlatLayout([(3,), (0,), (70,), (5,)])
    shifts = backend.index_shifts(layout.arrays.offsets, layout.arrays.sizes)
    assert shifts.dtype == np.int64
    assert (shifts + layout.arrays.offsets).tolist() == [0, 3, 3, 73]
