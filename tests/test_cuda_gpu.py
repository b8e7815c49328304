"""The CUDA backend on a real device: parity with the oracle, interop, graphs, determinism, bad input,
and the multi-tensor kernels (layout segments, tensor lists) against the oracle.

Every test is marked ``gpu``: skipped without a device, failing with FASTRADAM_REQUIRE_GPU=1
(tests/conftest.py). CuPy and torch are imported inside the tests, so a missing package fails
a required run instead of skipping it.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

import fastradam
from cuda_harness import MultiCase, bits, capturable_step
from fastradam.flavours import PRESETS
from fastradam.layout import FlatLayout
from fastradam.reference import reference_grad_norm
from oracle_check import assert_matches_oracle

pytestmark = pytest.mark.gpu

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
OPTIONS = (
    dict(weight_decay=0.0, decoupled_weight_decay=False, maximize=False),
    dict(weight_decay=0.05, decoupled_weight_decay=False, maximize=True),
    dict(weight_decay=0.05, decoupled_weight_decay=True, maximize=False),
)
SIZES = (0, 1, 3, 2**20 + 3)


@pytest.fixture(scope="module")
def cp():
    return importlib.import_module("cupy")


@pytest.fixture(scope="module")
def backend():
    return importlib.import_module("fastradam.backends.cuda")


def host_buffers(rng: np.random.Generator, dtype: np.dtype, n: int) -> tuple[np.ndarray, ...]:
    """Fresh random (p, g, m, v) on the host: nothing zero, v > 0."""
    return tuple(x.astype(dtype) for x in (
        rng.standard_normal(n), rng.standard_normal(n), 0.1 * rng.standard_normal(n),
        1e-6 + 1e-2 * rng.random(n)))


def device_buffers(cp, host: tuple, offset: int = 0) -> tuple:
    """Copies of ``host`` on the device, each a view ``offset`` elements into its allocation."""
    out = []
    for array in host:
        raw = cp.empty(array.size + offset, dtype=array.dtype)
        view = raw[offset:]
        view.set(array)
        out.append(view)
    return tuple(out)


def hyper_for(step: int, **options) -> dict:
    return dict(step=step, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, **options)


def written(buffers) -> tuple:
    p, _, m, v = buffers
    return tuple(x.get() for x in (p, m, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("options", OPTIONS, ids=("plain", "l2-maximize", "decoupled"))
@pytest.mark.parametrize("step", (3, 10))
def test_fused_step_matches_oracle(cp, dtype, n, options, step):
    host = host_buffers(np.random.default_rng([n, step, len(str(options))]), dtype, n)
    buffers = device_buffers(cp, host)
    hyper = hyper_for(step, **options)
    fastradam.fused_step(*buffers, **hyper)
    np.testing.assert_array_equal(buffers[1].get(), host[1])
    assert_matches_oracle(host, written(buffers), hyper)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", (1, 2, 3))
@pytest.mark.parametrize("n", (17, 4099, 2**20 + 3))
def test_views_offset_into_their_allocation(cp, dtype, offset, n):
    host = host_buffers(np.random.default_rng([offset, n]), dtype, n)
    buffers = device_buffers(cp, host, offset)
    assert buffers[0].data.ptr % 16 != 0 or (offset * dtype.itemsize) % 16 == 0
    hyper = hyper_for(7, weight_decay=0.01)
    fastradam.fused_step(*buffers, **hyper)
    assert_matches_oracle(host, written(buffers), hyper)


def test_determinism_bit_identical_reruns(cp):
    host = host_buffers(np.random.default_rng(1), np.dtype(np.float32), 2**20 + 3)
    results = []
    for _ in range(3):
        buffers = device_buffers(cp, host)
        for step in range(1, 9):
            fastradam.fused_step(*buffers, **hyper_for(step, weight_decay=0.01))
        results.append(written(buffers))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            np.testing.assert_array_equal(got, want)


def test_repeated_one_shot_steps_still_refuse_overlap(cp):
    """The one-shot step keeps the outcome of its checks by the buffers' fingerprints (addresses
    included): a view over another buffer's memory, with the very shapes of a checked call, is
    checked again and refused before any write."""
    host = host_buffers(np.random.default_rng(3), np.dtype(np.float32), 1000)
    buffers = device_buffers(cp, host)
    fastradam.fused_step(*buffers, **hyper_for(1))
    before = [b.get() for b in buffers]
    with pytest.raises(ValueError, match="share memory"):
        fastradam.fused_step(buffers[0], buffers[1], buffers[2], buffers[2][:], **hyper_for(2))
    assert all(np.array_equal(b.get(), a) for a, b in zip(before, buffers))


def test_torch_cuda_tensors_updated_in_place(cp):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA support here")
    host = host_buffers(np.random.default_rng(2), np.dtype(np.float32), 4099)
    tensors = [torch.from_numpy(x.copy()).cuda() for x in host]
    pointers = [t.data_ptr() for t in tensors]
    hyper = hyper_for(9, weight_decay=0.01)
    fastradam.fused_step(*tensors, **hyper)
    torch.cuda.synchronize()
    assert [t.data_ptr() for t in tensors] == pointers
    assert_matches_oracle(host, tuple(tensors[i].cpu().numpy() for i in (0, 2, 3)), hyper)


def test_torch_work_queued_before_the_call_is_seen(cp):
    """torch tensors are viewed from their addresses, not exported through DLPack; the call still
    orders CuPy's stream (here the null stream) after torch's current one (here a non-blocking
    side stream, busy for a while before it writes the gradients), as DLPack's handshake would."""
    torch = pytest.importorskip("torch")
    host = host_buffers(np.random.default_rng(3), np.dtype(np.float32), 2**20 + 3)
    tensors = [torch.from_numpy(x.copy()).cuda() for x in host]
    new_grads = -3.0 * host[1]
    new_grads_device = torch.from_numpy(new_grads).cuda()
    torch.cuda.synchronize()
    hyper = hyper_for(9, weight_decay=0.01)
    side = torch.cuda.Stream()
    assert cp.cuda.get_current_stream().ptr != side.cuda_stream
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # tens of milliseconds of device time before the write
        tensors[1].copy_(new_grads_device)
        fastradam.fused_step(*tensors, **hyper)
    torch.cuda.synchronize()
    assert_matches_oracle((host[0], new_grads, host[2], host[3]),
                          tuple(tensors[i].cpu().numpy() for i in (0, 2, 3)), hyper)


def test_numba_device_arrays_updated_in_place():
    numba_cuda = pytest.importorskip("numba.cuda")
    if not numba_cuda.is_available():
        pytest.skip("numba.cuda sees no device")
    host = host_buffers(np.random.default_rng(3), np.dtype(np.float64), 1023)
    arrays = [numba_cuda.to_device(x) for x in host]
    hyper = hyper_for(12, decoupled_weight_decay=True, weight_decay=0.01)
    fastradam.fused_step(*arrays, **hyper)
    numba_cuda.synchronize()
    assert_matches_oracle(host, tuple(arrays[i].copy_to_host() for i in (0, 2, 3)), hyper)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("step_dtype", (np.int32, np.int64, np.float32, np.float64))
@pytest.mark.parametrize("lr_kind", ("host", np.float32, np.float64))
def test_graph_replay_advances_the_device_step(cp, backend, dtype, step_dtype, lr_kind):
    host = host_buffers(np.random.default_rng([dtype.itemsize, lr_kind == "host"]), dtype, 2**16 + 3)
    buffers = device_buffers(cp, host, 1)
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02, decoupled_weight_decay=True, maximize=False)
    lr_value = 1e-2 if lr_kind == "host" else float(np.asarray(1e-2, dtype=lr_kind))
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        step = cp.zeros((), dtype=step_dtype)
        lr = lr_value if lr_kind == "host" else cp.asarray(lr_value, dtype=lr_kind)
        # Compile and load both kernels (the step's and the increment's) before capturing.
        capturable_step(backend, *device_buffers(cp, host), step + 1, lr, **options)
        step += 0
        stream.begin_capture()
        step += 1  # torch's capturable order: advance, then update with the new step
        capturable_step(backend, *buffers, step, lr, **options)
        graph = stream.end_capture()
        for t in range(1, 9):  # through the threshold: steps 1..5 unrectified, 6.. rectified
            before = tuple(x.get() for x in buffers)
            graph.launch(stream)
            stream.synchronize()
            assert float(step.get()) == t
            hyper = dict(step=t, lr=lr_value, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.02,
                         decoupled_weight_decay=True, maximize=False)
            assert_matches_oracle(before, written(buffers), hyper)


@pytest.mark.parametrize("flavour", ("authors", "optax", "paper"))
def test_graph_replay_follows_the_flavour(cp, backend, flavour):
    host = host_buffers(np.random.default_rng(len(flavour)), np.dtype(np.float32), 4099)
    buffers = device_buffers(cp, host, 1)
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02, decoupled_weight_decay=True,
                   maximize=False, flavour=PRESETS[flavour])
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        step = cp.zeros((), dtype=cp.int64)
        capturable_step(backend, *device_buffers(cp, host), step + 1, 1e-2, **options)
        step += 0
        stream.begin_capture()
        step += 1
        capturable_step(backend, *buffers, step, 1e-2, **options)
        graph = stream.end_capture()
        for t in range(1, 9):
            before = tuple(x.get() for x in buffers)
            graph.launch(stream)
            stream.synchronize()
            hyper = dict(step=t, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.02,
                         decoupled_weight_decay=True, maximize=False, flavour=flavour)
            assert_matches_oracle(before, written(buffers), hyper)


def test_capturable_step_equals_host_scalar_step(cp, backend):
    host = host_buffers(np.random.default_rng(4), np.dtype(np.float32), 2**20 + 3)
    device, twin = device_buffers(cp, host), device_buffers(cp, host)
    for t in range(1, 12):
        capturable_step(backend, *device, cp.asarray(t, dtype=cp.int64), 1e-2, beta1=0.9, beta2=0.999,
                                     eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, maximize=False)
        fastradam.fused_step(*twin, **hyper_for(t))
    for got, want in zip(written(device), written(twin)):
        np.testing.assert_allclose(got, want, rtol=4 * 2.0**-24, atol=0)


def test_capturable_step_rejects_bad_step_and_lr(cp, backend):
    buffers = device_buffers(cp, host_buffers(np.random.default_rng(5), np.dtype(np.float32), 64))
    before = written(buffers)
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, maximize=False)
    step = cp.ones((), dtype=cp.int64)
    bad = [
        (TypeError, dict(step=cp.ones((), dtype=cp.uint8), lr=1e-3)),
        (TypeError, dict(step=np.ones((), dtype=np.int64), lr=1e-3)),
        (ValueError, dict(step=cp.ones((1,), dtype=cp.int64), lr=1e-3)),
        (ValueError, dict(step=buffers[0][:1].view(cp.int32).reshape(()), lr=1e-3)),
        (TypeError, dict(step=step, lr=True)),
        (TypeError, dict(step=step, lr=cp.ones((), dtype=cp.float16))),
        (TypeError, dict(step=step, lr=np.ones((), dtype=np.float32))),
        (ValueError, dict(step=step, lr=cp.ones((2,), dtype=cp.float32))),
    ]
    for error, args in bad:
        with pytest.raises(error):
            capturable_step(backend, *buffers, args["step"], args["lr"], **options)
    for got, want in zip(written(buffers), before):
        np.testing.assert_array_equal(got, want)


def test_mixed_host_and_device_raises_before_writing(cp):
    host = host_buffers(np.random.default_rng(6), np.dtype(np.float32), 1023)
    buffers = list(device_buffers(cp, host))
    before = written(buffers)
    buffers[1] = host[1]
    with pytest.raises(TypeError):
        fastradam.fused_step(*buffers, **hyper_for(3))
    for got, want in zip(written(buffers), before):
        np.testing.assert_array_equal(got, want)


def test_two_devices_raise_before_writing(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two CUDA devices")
    host = host_buffers(np.random.default_rng(7), np.dtype(np.float32), 1023)
    buffers = list(device_buffers(cp, host))
    with cp.cuda.Device(1):
        buffers[3] = cp.asarray(host[3])
    before = written(buffers)
    with pytest.raises(ValueError, match="device"):
        fastradam.fused_step(*buffers, **hyper_for(3))
    for got, want in zip(written(buffers), before):
        np.testing.assert_array_equal(got, want)


# --- Multi-tensor kernels, through the backend functions ------------------------------------------


def sentinel_view(cp, values: np.ndarray, dtype: np.dtype, offset: int) -> tuple:
    """``(raw, view)`` on the device: ``view`` holds ``values``, ``offset`` elements into ``raw``;
    the rest of ``raw`` (8 elements past the end at least) is NaN."""
    raw = cp.full(values.size + offset + 8, np.nan, dtype=dtype)
    view = raw[offset:offset + values.size]
    view.set(values.astype(dtype))
    return raw, view


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", tuple(PRESETS))
@pytest.mark.parametrize("base", (0, 1))
def test_segments_match_oracle_and_leave_the_rest_alone(cp, backend, dtype, flavour, base):
    case = MultiCase(PRESETS[flavour])
    layout = case.layout()
    buffers = tuple(sentinel_view(cp, value, dtype, base)[1] for value in case.flat_values(layout))
    before = tuple(b.get() for b in buffers)
    floats, ints = case.tables(dtype)
    backend.radam_step_segments(*buffers, layout.arrays, case.index_row, floats, ints)
    # the tile table is cached by the backend, per layout (weakly), not inside the layout
    assert layout.arrays in backend.tables._LAYOUT_TABLES and "cuda" not in getattr(layout.arrays, "derived", {})
    case.check_segments(layout, before, tuple(b.get() for b in buffers))


def test_segments_second_call_reuses_the_cached_tiles_and_skips_all(cp, backend):
    case = MultiCase(PRESETS["torch"])
    layout = case.layout()
    buffers = device_buffers(cp, host_buffers(np.random.default_rng(8), np.dtype(np.float32), layout.size))
    floats, ints = case.tables(np.float32)
    backend.radam_step_segments(*buffers, layout.arrays, case.index_row, floats, ints)
    cached = dict(backend.tables._LAYOUT_TABLES[layout.arrays])
    before = written(buffers)
    backend.radam_step_segments(*buffers, layout.arrays, np.full(len(layout), -1, np.int32), floats, ints)
    for got, want in zip(written(buffers), before):
        np.testing.assert_array_equal(got, want)
    assert all(backend.tables._LAYOUT_TABLES[layout.arrays][k] is v for k, v in cached.items())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flavour", ("torch", "authors", "optax"))
def test_tensors_match_oracle_and_leave_the_rest_alone(cp, backend, dtype, flavour):
    case = MultiCase(PRESETS[flavour])
    all_bases = [((0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 0))[i % 3] for i in range(len(case.sizes))]
    raws, tensors = [], []
    for i, bases in enumerate(all_bases):
        pairs = [sentinel_view(cp, value, dtype, base) for value, base in zip(case.random_values(i), bases)]
        raws.append(tuple(raw for raw, _ in pairs))
        tensors.append(tuple(view for _, view in pairs))
    raws_before = [tuple(r.get() for r in quad) for quad in raws]
    floats, ints = case.tables(dtype)
    backend.radam_step_tensors(*(list(t) for t in zip(*tensors)), case.index_row, floats, ints)

    for i, (raw, raw_before, bases) in enumerate(zip(raws, raws_before, all_bases)):
        case.check_tensor(i, raw_before, tuple(r.get() for r in raw), bases)


def test_tensors_empty_list_launches_nothing(backend):
    floats, ints = MultiCase(PRESETS["torch"]).tables(np.float32)
    backend.radam_step_tensors([], [], [], [], np.zeros(0, np.int32), floats, ints)


def test_multi_tensor_kernels_equal_the_flat_kernel(cp, backend):
    """One segment, one tensor and the flat kernel give bit-identical results."""
    host = host_buffers(np.random.default_rng(9), np.dtype(np.float32), 2**20 + 3)
    case = MultiCase(PRESETS["torch"])
    floats, ints = case.tables(np.float32)
    layout = FlatLayout([(host[0].size,)])
    flat, segment, tensor = (device_buffers(cp, host) for _ in range(3))
    backend.radam_step(*flat, floats[2:3], ints[2:3])
    backend.radam_step_segments(*segment, layout.arrays, np.array([2], np.int32), floats, ints)
    backend.radam_step_tensors(*([b] for b in tensor), np.array([2], np.int32), floats, ints)
    for other in (segment, tensor):
        for got, want in zip(written(other), written(flat)):
            np.testing.assert_array_equal(got, want)


# --- Gradient clipping (fastradam.clipping), through the real launches, against the Numba backend ----------

NORM_TYPES = (2.0, 1.0, float("inf"), 3.0)


#: The options of the clipped steps (step 9: rectified).
CLIP_OPTIONS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, decoupled_weight_decay=True)


def clip_hyper(step: int = 9) -> dict:
    return dict(CLIP_OPTIONS, step=step)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", (1, 4099, 2**20 + 3))
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
def test_clipped_step_matches_the_numba_backend(cp, dtype, n, norm_type):
    """The device norm (a 0-d float64 array, no synchronisation) equals the Numba backend's to float64
    rounding; given that norm, the Numba step has the very bits of the device's."""
    host = host_buffers(np.random.default_rng([n, int(min(norm_type, 9))]), dtype, n)
    host = (host[0], 8.0 * host[1], host[2], host[3])
    buffers = device_buffers(cp, host, 1)
    options = dict(clip_hyper(), grad_scale=8.0, norm_type=norm_type)
    norm = fastradam.fused_step(*buffers, max_grad_norm=0.5, **options)
    assert isinstance(norm, cp.ndarray) and norm.shape == () and norm.dtype == cp.float64
    ours = [b.copy() for b in host]
    theirs = [b.copy() for b in host]
    assert float(norm) == pytest.approx(fastradam.fused_step(*ours, max_grad_norm=0.5, **options), rel=1e-12)
    fastradam.StepPlan(*theirs, **CLIP_OPTIONS).step(9, grad_scale=8.0, max_grad_norm=0.5, norm_type=norm_type,
                                                     grad_norm=float(norm))
    for got, want in zip((b.get() for b in buffers), theirs):
        np.testing.assert_array_equal(bits(got), bits(want))


def test_clipped_layout_and_tensor_list_match_the_numba_backend(cp):
    case = MultiCase(PRESETS["torch"])
    layout = FlatLayout([(n,) for n in case.sizes])  # one group
    host = [np.nan_to_num(x, nan=0.25).astype(np.float32) for x in case.flat_values(layout)]
    has_grad = case.index_row >= 0
    steps = np.full(len(case.sizes), 9)
    device = [cp.asarray(x) for x in host]
    norm = fastradam.fused_step_layout(layout, *device, steps=steps, has_grad=has_grad, max_grad_norm=1.0,
                                       norm_type=3.0)
    theirs = [x.copy() for x in host]
    fastradam.StepPlan(*theirs, layout=layout).step(steps=steps, has_grad=has_grad, max_grad_norm=1.0, norm_type=3.0,
                                                    grad_norm=float(norm))
    for got, want in zip(device, theirs):
        np.testing.assert_array_equal(bits(got.get()), bits(want))
    tensors = [[x.astype(np.float32) for x in case.random_values(i)] for i in range(len(case.sizes))]
    device = [[cp.asarray(x) for x in t] for t in tensors]
    norm = fastradam.fused_step_multi(*(list(r) for r in zip(*device)), steps=steps, has_grad=has_grad,
                                      max_grad_norm=1.0, norm_type="inf")
    want = reference_grad_norm([t[1] for t, a in zip(tensors, has_grad) if a], float("inf"))
    assert float(norm) == want  # the largest magnitude: exact
    fastradam.fused_step_multi(*(list(r) for r in zip(*tensors)), steps=steps, has_grad=has_grad,
                               max_grad_norm=1.0, norm_type="inf")
    for ours, their in zip(device, tensors):
        for got, want in zip(ours, their):
            np.testing.assert_array_equal(bits(got.get()), bits(want))


def test_clipped_norm_has_the_same_bits_on_every_run(cp):
    host = host_buffers(np.random.default_rng(11), np.dtype(np.float32), 2**22 + 5)
    norms = []
    for _ in range(3):
        buffers = device_buffers(cp, host)
        norms.append(fastradam.fused_step(*buffers, max_grad_norm=1.0, **clip_hyper()).get().tobytes())
    assert len(set(norms)) == 1


@pytest.mark.parametrize("bad", (np.nan, np.inf))
def test_clipped_check_finite_skips_and_found_inf_skips_after_the_norm(cp, bad):
    host = host_buffers(np.random.default_rng(12), np.dtype(np.float32), 70001)
    buffers = device_buffers(cp, host)
    buffers[1][70000] = bad
    before = written(buffers)
    norm = fastradam.fused_step(*buffers, max_grad_norm=1.0, check_finite=True, **clip_hyper())
    assert not np.isfinite(float(norm))
    buffers[1][70000] = 0.5
    norm = fastradam.fused_step(*buffers, max_grad_norm=1.0, found_inf=cp.ones((), cp.bool_), **clip_hyper())
    assert np.isfinite(float(norm))
    norm = fastradam.fused_step(*buffers, max_grad_norm=1.0, found_inf=True, **clip_hyper())
    assert np.isfinite(float(norm))
    for got, want in zip(written(buffers), before):
        np.testing.assert_array_equal(got, want)


def test_grad_norm_alone_and_a_given_device_norm(cp):
    host = host_buffers(np.random.default_rng(13), np.dtype(np.float32), 4099)
    buffers = device_buffers(cp, host)
    plan = fastradam.StepPlan(*buffers, lr=1e-2)
    before = written(buffers)
    norm = plan.grad_norm(2.0, grad_scale=4.0)
    assert isinstance(norm, cp.ndarray) and norm.dtype == cp.float64
    for got, want in zip(written(buffers), before):
        np.testing.assert_array_equal(got, want)
    assert float(norm) == pytest.approx(reference_grad_norm([host[1]], 2.0, 4.0), rel=1e-12)
    twin = device_buffers(cp, host)
    returned = plan.step(step=3, grad_scale=4.0, max_grad_norm=0.1, grad_norm=norm.astype(cp.float32))
    assert float(returned) == float(np.float32(float(norm)))
    fastradam.StepPlan(*twin, lr=1e-2).step(step=3, grad_scale=4.0, max_grad_norm=0.1,
                                            grad_norm=float(np.float32(float(norm))))
    for got, want in zip(written(buffers), written(twin)):
        np.testing.assert_array_equal(got, want)


def test_clipped_capturable_step_replays_in_a_graph(cp, backend):
    """Pre-pass and update are captured together: each replay clips by the norm of the gradients it
    finds (the very bits of a host-step clipped step's norm), advancing the device step; the step as
    the host-step one's to the device's folding of the scalars (as test_capturable_step_equals_host_scalar_step)."""
    host = host_buffers(np.random.default_rng(14), np.dtype(np.float32), 2**16 + 3)
    buffers, twin = device_buffers(cp, host, 1), device_buffers(cp, host, 1)
    plan, twin_plan = fastradam.StepPlan(*buffers, lr=1e-2), fastradam.StepPlan(*twin, lr=1e-2)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        step = cp.zeros((), dtype=cp.int64)
        fastradam.StepPlan(*device_buffers(cp, host, 1), lr=1e-2).step(step=step + 1, max_grad_norm=0.5)  # compile
        stream.synchronize()
        stream.begin_capture()
        step += 1
        norm = plan.step(step=step, max_grad_norm=0.5)
        graph = stream.end_capture()
        for t in range(1, 8):
            graph.launch(stream)
            want = twin_plan.step(step=t, max_grad_norm=0.5)
            stream.synchronize()
            assert float(norm) == float(want)
            for got, expected in zip(written(buffers), written(twin)):
                np.testing.assert_allclose(got, expected, rtol=4 * 2.0**-24, atol=0)


def test_a_given_norm_must_be_a_0d_float_device_array(cp, backend):
    with pytest.raises(TypeError, match="dtype float32 or float64"):
        backend.check_norm(cp.zeros((), cp.int32))
    with pytest.raises(ValueError, match="0-d"):
        backend.check_norm(cp.zeros((1,), cp.float64))
    assert backend.check_norm(cp.zeros((), cp.float32)).dtype == cp.float32
