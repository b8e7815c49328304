"""The CUDA kernels of kernels/radam.cu, built for the CPU by g++ (tests/cuda_harness.py), against the oracle.

No GPU needed: the same source CuPy compiles runs here block by block and thread by thread,
so its element math, device-side scalars, grid-stride indexing, tile tables and
head/vector/tail split are checked on every CI run, for every flavour preset.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuda_harness
from cuda_harness import MultiCase, bits, scalars_for
from fastradam.spec import SCALAR_FLOATS
from fastradam.flavours import PRESETS, Flavour
from fastradam.scalars import HOLD, MOMENTUM, RECTIFIED, pack_rows, sma_length, step_scalars
from oracle_check import assert_matches_oracle

pytestmark = pytest.mark.skipif(cuda_harness.compiler() is None, reason="no host C++ compiler (g++ or $CXX)")

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
FLAVOURS = tuple(PRESETS.values())
#: The CuPy backend's launch shape and deliberately odd ones: one thread, a grid smaller than
#: the work (grid-stride), one larger than the work (idle threads).
GRIDS = ((1, 1), (3, 64), (1056, 256), (5000, 32))


@pytest.fixture(scope="module")
def harness() -> cuda_harness.Harness:
    return cuda_harness.Harness(cuda_harness.build())


@pytest.fixture(scope="module")
def backend():
    """The CUDA backend module, for its host-side tables (needs CuPy importable, not a GPU)."""
    return pytest.importorskip("fastradam.backends.cuda")


def aligned_view(values: np.ndarray, dtype: np.dtype, offset: int, fill: float = np.nan) -> tuple:
    """``(raw, view)``: ``view`` holds ``values`` and starts ``offset`` elements past a 64-byte
    boundary of ``raw``, whose other elements (8 on each side at least) are ``fill``."""
    n = values.size
    storage = np.empty((n + offset + 8) * dtype.itemsize + 64, dtype=np.uint8)
    start = -storage.ctypes.data % 64
    raw = storage[start:start + (n + offset + 8) * dtype.itemsize].view(dtype)
    raw[...] = fill
    view = raw[offset:offset + n]
    view[...] = values
    return raw, view


def make_buffers(rng: np.random.Generator, dtype: np.dtype, n: int, offsets=(0, 0, 0, 0)) -> tuple:
    """Fresh random (p, g, m, v), each a view starting ``offset`` elements past a 64-byte boundary."""
    values = (rng.standard_normal(n), rng.standard_normal(n), 0.1 * rng.standard_normal(n),
              1e-6 + 1e-2 * rng.random(n))
    return tuple(aligned_view(value, dtype, offset)[1] for value, offset in zip(values, offsets))


def hyperparameters(step: int, *, weight_decay: float = 0.0, decoupled: bool = False,
                    maximize: bool = False, beta2: float = 0.999, flavour: Flavour = PRESETS["torch"]) -> dict:
    return dict(step=step, lr=1e-2, betas=(0.9, beta2), eps=1e-8, weight_decay=weight_decay,
                decoupled_weight_decay=decoupled, maximize=maximize, flavour=flavour)


def run_step(harness, buffers: tuple, hyper: dict, grid: int = 1056, block: int = 256) -> tuple:
    """One flat kernel step with the API's one-row tables; returns (before, after)."""
    before = tuple(b.copy() for b in buffers)
    floats, ints = pack_rows([scalars_for(hyper)], buffers[0].dtype)
    harness.step(buffers, floats, ints, grid, block)
    np.testing.assert_array_equal(buffers[1], before[1])  # grads are read only
    return before, (buffers[0], buffers[2], buffers[3])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", (0, 1, 3, 15, 16, 17, 1023, 4099))
@pytest.mark.parametrize("offset", (0, 1, 2, 3))
@pytest.mark.parametrize("grid,block", GRIDS)
def test_sizes_views_and_grids_match_oracle(harness, dtype, n, offset, grid, block):
    rng = np.random.default_rng([n, offset, grid, block, dtype.itemsize])
    hyper = hyperparameters(step=int(rng.integers(1, 20)), weight_decay=0.01)
    before, after = run_step(harness, make_buffers(rng, dtype, n, (offset,) * 4), hyper, grid, block)
    assert_matches_oracle(before, after, hyper)


BRANCH_STEPS = (1, 2, 3, 4, 5, 6, 7, 100, 10**6)


def test_branch_steps_reach_every_mode_of_every_flavour():
    modes = {flavour.name: {step_scalars(step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                         decoupled_weight_decay=False, maximize=False, flavour=flavour).mode
                            for step in BRANCH_STEPS} for flavour in FLAVOURS}
    for name, seen in modes.items():
        below = HOLD if PRESETS[name].below_threshold == "none" else MOMENTUM
        assert seen == {below, RECTIFIED}, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", FLAVOURS, ids=lambda f: f.name)
@pytest.mark.parametrize("step", BRANCH_STEPS)
@pytest.mark.parametrize("decay", ("none", "l2", "decoupled"))
@pytest.mark.parametrize("maximize", (False, True))
def test_options_flavours_and_branches_match_oracle(harness, dtype, flavour, step, decay, maximize):
    rng = np.random.default_rng([step, len(decay), maximize, dtype.itemsize, len(flavour.name)])
    hyper = hyperparameters(step, weight_decay=0.0 if decay == "none" else 0.05,
                            decoupled=decay == "decoupled", maximize=maximize, flavour=flavour)
    buffers = make_buffers(rng, dtype, 1023, (1,) * 4)
    before, after = run_step(harness, buffers, hyper)
    assert_matches_oracle(before, after, hyper)
    if scalars_for(hyper).mode == HOLD:
        np.testing.assert_array_equal(after[0], before[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hold_leaves_params_alone_even_with_non_finite_gradients(harness, dtype):
    hyper = hyperparameters(2, weight_decay=0.1, decoupled=True, flavour=PRESETS["authors"])
    assert scalars_for(hyper).mode == HOLD
    buffers = make_buffers(np.random.default_rng(1), dtype, 1023)
    buffers[1][::3] = np.inf
    buffers[1][1::3] = np.nan
    params = buffers[0].copy()
    run_step(harness, buffers, hyper)
    np.testing.assert_array_equal(bits(buffers[0]), bits(params))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset,grid,block", ((0, 1056, 256), (3, 7, 96)))
def test_large_buffer_matches_oracle(harness, dtype, offset, grid, block):
    rng = np.random.default_rng([offset, dtype.itemsize])
    hyper = hyperparameters(step=50, weight_decay=0.01, decoupled=True)
    before, after = run_step(harness, make_buffers(rng, dtype, 2**20 + 3, (offset,) * 4), hyper, grid, block)
    assert_matches_oracle(before, after, hyper)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offsets", ((0, 0, 0, 0), (1, 1, 1, 1), (3, 3, 3, 3), (0, 1, 0, 0), (0, 0, 0, 3)))
def test_vector_path_taken_when_coaligned(harness, dtype, offsets):
    n = 4099
    lanes = 16 // dtype.itemsize
    buffers = make_buffers(np.random.default_rng(0), dtype, n, offsets)
    run_step(harness, buffers, hyperparameters(step=10), grid=5, block=64)
    vector, scalar = harness.counts()
    assert vector + scalar == n
    if len({offset % lanes for offset in offsets}) == 1:  # one byte offset modulo 16
        head = -offsets[0] % lanes
        assert scalar == head + (n - head) % lanes
        assert vector == n - scalar > 0
    else:
        assert (vector, scalar) == (0, n)


STEPS = sorted({*range(1, 101), *np.unique(np.geomspace(1, 10**7, 200).astype(np.int64)).tolist(), 10**7})
BETAS = ((0.9, 0.999), (0.9, 0.99999), (0.5, 0.0), (0.0, 0.99), (0.99, 0.9), (0.95, 0.98))
#: Flavours whose threshold is exactly rho_6 (beta2 = 0.999): the comparison decides step 6.
EDGE_FLAVOURS = tuple(Flavour(f"edge-{inclusive}", threshold=sma_length(6, 0.999)[1], inclusive=inclusive)
                      for inclusive in (False, True))


@pytest.mark.parametrize("beta1,beta2", BETAS)
@pytest.mark.parametrize("weight_decay,decoupled,maximize,eps_root", (
    (0.0, False, False, 0.0), (0.1, False, True, 1e-7), (0.1, True, False, 0.0), (0.0, False, False, 2.5e-3)))
@pytest.mark.parametrize("flavour", FLAVOURS + EDGE_FLAVOURS, ids=lambda f: f.name)
def test_device_scalars_match_host_scalars(harness, backend, beta1, beta2, weight_decay, decoupled, maximize,
                                           eps_root, flavour):
    for step in STEPS:
        options = dict(lr=3e-3, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=weight_decay,
                       decoupled_weight_decay=decoupled, maximize=maximize, flavour=flavour, eps_root=eps_root)
        host = step_scalars(step=step, **options)
        device = harness.step_scalars(step=float(step), **options)
        assert (device.mode, device.negate_grad) == (host.mode, host.negate_grad), step
        for field in SCALAR_FLOATS[:-1]:
            want, got = getattr(host, field), getattr(device, field)
            assert abs(got - want) <= 1e-15 * abs(want), (step, field, got, want)


def test_edge_flavours_split_on_the_comparison():
    modes = [step_scalars(step=6, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                          decoupled_weight_decay=False, maximize=False, flavour=f).mode for f in EDGE_FLAVOURS]
    assert modes == [MOMENTUM, RECTIFIED]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("step_dtype", (np.int32, np.int64, np.float32, np.float64))
@pytest.mark.parametrize("lr_kind", ("host", np.float32, np.float64))
@pytest.mark.parametrize("step", (3, 6, 1000))
def test_capturable_kernel_matches_oracle_and_host_scalar_kernel(harness, backend, dtype, step_dtype, lr_kind,
                                                                 step):
    check_capturable(harness, dtype, np.array(step, dtype=step_dtype),
                     2e-3 if lr_kind == "host" else np.array(2e-3, dtype=lr_kind), PRESETS["torch"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", FLAVOURS + EDGE_FLAVOURS, ids=lambda f: f.name)
@pytest.mark.parametrize("step", (1, 4, 5, 6, 7, 1000))
def test_capturable_kernel_follows_every_flavour(harness, backend, dtype, flavour, step):
    check_capturable(harness, dtype, np.array(step, dtype=np.int64), 2e-3, flavour)


def test_capturable_lrs_checks_only_the_groups_in_use(backend):
    # A group that no active segment uses gets 0.0 unchecked (its lr may live on another device);
    # a used one must be a real number (or a 0-d device array, checked on a GPU).
    refs = backend.capturable_lrs([2e-3, object(), 5e-4], np.array([0, -1, 2, 0], np.int32), ())
    assert refs == [2e-3, 0.0, 5e-4]
    with pytest.raises(TypeError, match=r"lrs\[0\] must be a real number or a 0-d CUDA array, got bool"):
        backend.capturable_lrs([True], np.array([0], np.int32), ())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", ("torch", "optax"))
@pytest.mark.parametrize("step", (3, 6, 1000))
def test_capturable_kernel_with_eps_root(harness, backend, dtype, flavour, step):
    check_capturable(harness, dtype, np.array(step, dtype=np.int64), 2e-3, PRESETS[flavour], eps_root=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", ("torch", "optax"))
@pytest.mark.parametrize("eps_root", (1e-8, 1e-4))
def test_flat_kernel_with_eps_root_matches_oracle(harness, dtype, flavour, eps_root):
    """eps_root reaches the element update (sqrt(v + eps_root bc2)): the oracle agrees, and the step
    differs from one without it, so the option is not silently dropped."""
    rng = np.random.default_rng(17)
    buffers = make_buffers(rng, dtype, 1023, (1, 1, 1, 1))
    twin = tuple(b.copy() for b in buffers)
    hyper = dict(hyperparameters(40, flavour=PRESETS[flavour]), eps_root=eps_root)
    before, after = run_step(harness, buffers, hyper)
    assert_matches_oracle(before, after, hyper)
    run_step(harness, twin, dict(hyper, eps_root=0.0))
    assert not np.array_equal(buffers[0], twin[0])


def check_capturable(harness, dtype: np.dtype, step: np.ndarray, lr, flavour: Flavour, eps_root: float = 0.0) -> None:
    """The capturable kernel matches the oracle, and the host-scalar kernel bit for bit."""
    rng = np.random.default_rng([int(step), dtype.itemsize, len(flavour.name)])
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02, decoupled_weight_decay=True, maximize=True)
    buffers = make_buffers(rng, dtype, 1023, (2,) * 4)
    twin = tuple(b.copy() for b in buffers)
    before = tuple(b.copy() for b in buffers)
    harness.step_capturable(buffers, step, lr, grid=3, block=64, flavour=flavour, eps_root=eps_root, **options)
    hyper = dict(step=int(step), lr=float(lr), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.02,
                 decoupled_weight_decay=True, maximize=True, flavour=flavour, eps_root=eps_root)
    assert_matches_oracle(before, (buffers[0], buffers[2], buffers[3]), hyper)
    run_step(harness, twin, hyper)
    for got, want in zip(buffers, twin):
        np.testing.assert_array_equal(got, want)


# --- The multi-tensor kernels ---------------------------------------------------------------


def test_pack_tables_places_each_table_aligned(backend):
    tables = (np.arange(3, dtype=np.int32), np.ones((2, 7), dtype=np.float32), np.arange(8, dtype=np.int64))
    packed, offsets = backend.pack_tables(*tables)
    assert all(offset % 16 == 0 for offset in offsets)
    for table, offset in zip(tables, offsets):
        np.testing.assert_array_equal(packed[offset:offset + table.nbytes].view(table.dtype), table.reshape(-1))


MULTI_GRIDS = ((3, 64), (1056, 256))
#: Base offsets (elements past a 64-byte boundary) of the four buffers: vector path with
#: aligned tiles, vector path with a scalar head per tile, scalar path only.
BASES = ((0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", FLAVOURS, ids=lambda f: f.name)
@pytest.mark.parametrize("bases", BASES, ids=("aligned", "coaligned", "misaligned"))
@pytest.mark.parametrize("grid,block", MULTI_GRIDS)
def test_segments_kernel_matches_oracle_and_leaves_the_rest_alone(harness, backend, dtype, flavour, bases,
                                                                    grid, block):
    case = MultiCase(flavour)
    layout = case.layout()
    buffers = tuple(aligned_view(value, dtype, base)[1] for value, base in zip(case.flat_values(layout), bases))
    before = tuple(b.copy() for b in buffers)
    floats, ints = case.tables(dtype)
    harness.step_segments(buffers, layout.arrays, case.index_row, floats, ints, grid, block)
    case.check_segments(layout, before, buffers)
    check_counts(harness, dtype, [n for n, row in zip(case.sizes, case.index_row) if row >= 0], [bases] * len(case.sizes))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", FLAVOURS, ids=lambda f: f.name)
@pytest.mark.parametrize("grid,block", MULTI_GRIDS)
def test_tensors_kernel_matches_oracle_and_leaves_the_rest_alone(harness, backend, dtype, flavour, grid, block):
    case = MultiCase(flavour)
    all_bases = [BASES[i % len(BASES)] for i in range(len(case.sizes))]
    raws, tensors = [], []
    for i, bases in enumerate(all_bases):
        pairs = [aligned_view(value, dtype, base) for value, base in zip(case.random_values(i), bases)]
        raws.append(tuple(raw for raw, _ in pairs))
        tensors.append(tuple(view for _, view in pairs))
    raws_before = [tuple(r.copy() for r in quad) for quad in raws]
    floats, ints = case.tables(dtype)
    harness.step_tensors(tensors, case.index_row, floats, ints, grid, block)
    for i, (raw, raw_before, bases) in enumerate(zip(raws, raws_before, all_bases)):
        case.check_tensor(i, raw_before, raw, bases)
    active = case.index_row >= 0
    check_counts(harness, dtype, [n for n, a in zip(case.sizes, active) if a],
                 [b for b, a in zip(all_bases, active) if a])


def check_counts(harness, dtype: np.dtype, sizes: list[int], bases: list[tuple]) -> None:
    """Every active element was updated once, by 16-byte packs wherever the bases allow."""
    vector, scalar = harness.counts()
    assert vector + scalar == sum(sizes)
    lanes = 16 // dtype.itemsize
    tile = pytest.importorskip("fastradam.backends.cuda").TILE
    want_scalar = 0
    for n, base in zip(sizes, bases):
        if len(set(base)) > 1:
            want_scalar += n
            continue
        for start in range(0, n, tile):  # each tile: scalar head to the 16-byte boundary, vector body, tail
            length = min(tile, n - start)
            head = min(-(base[0] + start) % lanes, length)
            want_scalar += head + (length - head) % lanes
    assert scalar == want_scalar


# --- Bit-for-bit agreement with the Numba backend -----------------------------------------------


@pytest.fixture(scope="module")
def numba_backend():
    return pytest.importorskip("fastradam.backends.numba")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", FLAVOURS, ids=lambda f: f.name)
def test_segments_kernel_rounds_like_the_numba_backend(harness, backend, numba_backend, dtype, flavour):
    case = MultiCase(flavour)
    layout = case.layout()
    rng = np.random.default_rng(len(flavour.name))
    values = (rng.standard_normal(layout.size), rng.standard_normal(layout.size),
              0.1 * rng.standard_normal(layout.size), 1e-6 + 1e-2 * rng.random(layout.size))
    ours = tuple(aligned_view(value, dtype, 1)[1] for value in values)
    theirs = tuple(np.array(value, dtype=dtype) for value in values)
    floats, ints = case.tables(dtype)
    harness.step_segments(ours, layout.arrays, case.index_row, floats, ints, 1056, 256)
    numba_backend.bind_segments(*theirs, layout.arrays)(case.index_row, floats, ints)
    for got, want in zip(ours, theirs):
        np.testing.assert_array_equal(bits(got), bits(want))


# --- Immutable DLPack producers are refused, before anything is written -----------------------


def immutable_array(module: str, device: tuple[int, int] = (2, 0)):
    """A stand-in for a JAX array or TensorFlow tensor (its type's ``__module__``), on ``device``
    (DLPack: 2 is CUDA), which fails the test if anything tries to export it."""

    class ArrayImpl:
        __dlpack_device__ = staticmethod(lambda: device)
        shape, dtype, size = (8,), np.dtype(np.float32), 8

        def __dlpack__(self, *args, **kwargs):
            raise AssertionError("an immutable array was exported: it should have been refused first")

    ArrayImpl.__module__, ArrayImpl.__qualname__ = module, "ArrayImpl"
    return ArrayImpl()


IMMUTABLE_MODULES = ("jaxlib.xla_extension", "jaxlib._jax", "jax._src.array", "tensorflow.python.framework.ops")


@pytest.mark.parametrize("module", IMMUTABLE_MODULES)
@pytest.mark.parametrize("device", ((2, 0), (1, 0)), ids=("cuda", "cpu"))
def test_immutable_arrays_are_refused_by_the_public_step(module, device):
    import fastradam

    buffers = [np.zeros(8, np.float32) for _ in range(4)]
    buffers[2] = immutable_array(module, device)  # exp_avg, which the step writes
    producer = "TensorFlow" if module.startswith("tensorflow") else "JAX"
    with pytest.raises(TypeError, match=f"exp_avg is a {producer} array .*immutable.*writes its buffers"
                                        ".*in place.*copy it into a CuPy array"):
        fastradam.fused_step(*buffers, step=1)
    assert all(not b.any() for i, b in enumerate(buffers) if i != 2)


def test_immutable_arrays_are_refused_by_the_registry_and_by_interop(backend):
    from fastradam.backends import backend_for, refuse_immutable

    array = immutable_array("jaxlib.xla_extension")
    with pytest.raises(TypeError, match="grads is a JAX array .*xla_extension.ArrayImpl.*immutable"):
        backend_for(("params", "grads"), (np.zeros(8, np.float32), array))
    with pytest.raises(TypeError, match="lr is a JAX array"):
        refuse_immutable("lr", array)
    refuse_immutable("params", np.zeros(8, np.float32))  # everything else passes
    refuse_immutable("params", immutable_array("jaxtyping"))  # only the producers' own packages
    # a direct caller of the CUDA backend is refused too, before any DLPack export
    with pytest.raises(TypeError, match="JAX array .*immutable"):
        backend.as_arrays([array])
    with pytest.raises(TypeError, match="TensorFlow array .*immutable"):
        backend.storage_of(immutable_array("tensorflow.python.framework.ops"))


def test_real_jax_arrays_are_refused():
    jnp = pytest.importorskip("jax.numpy")
    import fastradam

    params = jnp.zeros(8, dtype=jnp.float32)
    with pytest.raises(TypeError, match="params is a JAX array .*immutable"):
        fastradam.fused_step(params, *(np.zeros(8, np.float32) for _ in range(3)), step=1)


# --- What the backend derives from a layout lives in the backend, and dies with the layout ----


def test_layout_tables_are_kept_by_the_backend_weakly(backend):
    import gc

    from fastradam.layout import FlatLayout

    segments = FlatLayout([(3, 4), (5,)]).arrays
    cache = backend.tables._layout_cache(segments)
    cache["tiles"] = "a host tile table"
    assert backend.tables._layout_cache(segments) is cache
    assert "cuda" not in getattr(segments, "derived", {})
    del segments, cache
    gc.collect()
    assert len(backend.tables._LAYOUT_TABLES) == 0


def test_kernel_names_follow_cupys_name_expressions(backend):
    storage = backend.Storage("bfloat16", "float16", "float32", True)
    assert backend.kernel_name("segments", storage) == (
        "fastradam::radam_step_segments<fastradam::bfloat16_t, fastradam::float16_t, float, fastradam::FloatMaster>")
    assert backend.kernel_name("prepass_tensors", storage) == "fastradam::prepass_tensors<fastradam::float16_t>"
    assert backend.name_expressions(storage) == tuple(backend.kernel_name(k, storage) for k in backend.KERNEL_KINDS)
    with pytest.raises(ValueError, match="unknown kernel kind 'flat'"):
        backend.kernel_name("flat", storage)
