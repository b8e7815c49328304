"""Mixed precision on a real device: every storage combination through ``fastradam.fused_step`` on
torch CUDA tensors (bfloat16 has no CuPy dtype) and CuPy arrays, the CUDA conversion intrinsics
against ml_dtypes/NumPy, found_inf as a device flag inside a CUDA graph, and check_finite; bfloat16
params kept by int16 remainders or rounded stochastically, bit for bit as the Numba backend.

Marked ``gpu``: skipped without a device, failing with FASTRADAM_REQUIRE_GPU=1.
"""

from __future__ import annotations

import functools
import importlib

import ml_dtypes
import numpy as np
import pytest

from cuda_harness import KEEPING, capturable_step, keeping_tables, scalars_for
import fastradam
import fastradam.backends.numba as numba
from fastradam.options import check_group
from oracle_check import assert_matches_oracle
from test_mixed_precision import COMBINATIONS, IDS

pytestmark = pytest.mark.gpu

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def cp():
    return importlib.import_module("cupy")


@pytest.fixture(scope="module")
def torch():
    torch = importlib.import_module("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA support here")
    return torch


@pytest.fixture(scope="module")
def backend():
    return importlib.import_module("fastradam.backends.cuda")


def to_torch(torch, array: np.ndarray):
    """A CUDA tensor holding ``array`` (bfloat16 through its bits)."""
    if array.dtype == BF16:
        return torch.from_numpy(array.view(np.int16).copy()).cuda().view(torch.bfloat16)
    return torch.from_numpy(array.copy()).cuda()


def to_numpy(tensor, dtype: np.dtype) -> np.ndarray:
    import torch

    if dtype == BF16:
        return tensor.view(torch.int16).cpu().numpy().view(BF16)
    return tensor.cpu().numpy()


def host_values(combo, n: int, seed: int):
    rng = np.random.default_rng([seed, n])
    params, grads, moments, master = combo
    values = (rng.standard_normal(n), rng.standard_normal(n), 0.1 * rng.standard_normal(n),
              1e-6 + 1e-2 * rng.random(n))
    stored = [v.astype(d) for v, d in zip(values, (params, grads, moments, moments))]
    return stored, (None if master is None else stored[0].astype(np.float32))


@pytest.mark.parametrize("combo", COMBINATIONS, ids=IDS)
@pytest.mark.parametrize("n", (1, 17, 4099, 2**20 + 3))
@pytest.mark.parametrize("hyper", [{"step": 3}, {"step": 40, "weight_decay": 0.1, "decoupled_weight_decay": True,
                                                 "maximize": True, "flavour": "optax"}], ids=str)
def test_torch_tensors_of_every_storage_match_the_oracle(torch, combo, n, hyper):
    stored, master = host_values(combo, n, 1)
    tensors = [to_torch(torch, a) for a in stored]
    master_t = None if master is None else to_torch(torch, master)
    pointers = [t.data_ptr() for t in tensors]
    hyper = {"lr": 1e-2, **hyper}
    fastradam.fused_step(*tensors, master_params=master_t, **hyper)
    torch.cuda.synchronize()
    assert [t.data_ptr() for t in tensors] == pointers
    after = [to_numpy(t, a.dtype) for t, a in zip(tensors, stored)]
    assert after[1].tobytes() == stored[1].tobytes()
    new_params = after[0] if master is None else master_t.cpu().numpy()
    assert_matches_oracle((stored[0] if master is None else master, *stored[1:]), (new_params, after[2], after[3]),
                          hyper)
    if master is not None:
        assert after[0].tobytes() == new_params.astype(combo[0]).tobytes()


@pytest.mark.parametrize("combo", [c for c in COMBINATIONS if c[0].itemsize == 2 or c[2].itemsize == 2],
                         ids=[i for c, i in zip(COMBINATIONS, IDS) if c[0].itemsize == 2 or c[2].itemsize == 2])
def test_16_bit_results_are_the_float32_results_rounded_bit_for_bit(torch, combo):
    stored, master = host_values(combo, 4099, 2)
    wide = [a.astype(np.float32) for a in stored]
    if master is not None:
        wide[0] = master.copy()
    narrow_t = [to_torch(torch, a) for a in stored]
    wide_t = [to_torch(torch, a) for a in wide]
    master_t = None if master is None else to_torch(torch, master)
    fastradam.fused_step(*wide_t, step=10, lr=1e-2, weight_decay=0.1)
    fastradam.fused_step(*narrow_t, step=10, lr=1e-2, weight_decay=0.1, master_params=master_t)
    for k in (0, 2, 3):
        full = wide_t[k].cpu().numpy()
        assert to_numpy(narrow_t[k], stored[k].dtype).tobytes() == full.astype(stored[k].dtype).tobytes()


CONVERSION_SOURCE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
extern "C" __global__ void widen(const unsigned short* in, float* bf16, float* f16, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        bf16[i] = __bfloat162float(__ushort_as_bfloat16(in[i]));
        f16[i] = __half2float(__ushort_as_half(in[i]));
    }
}
extern "C" __global__ void narrow(const float* in, unsigned short* bf16, unsigned short* f16, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        bf16[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
        f16[i] = __half_as_ushort(__float2half_rn(in[i]));
    }
}
"""


def test_device_conversions_equal_astype(cp, backend):
    """The intrinsics the kernels use, compiled as the backend compiles (CuPy adds -ftz=true):
    bit-exact against ml_dtypes/NumPy except NaN payloads (NaN stays NaN)."""
    module = cp.RawModule(code=CONVERSION_SOURCE, options=backend.compile_options())
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bf16, f16 = cp.empty(1 << 16, cp.float32), cp.empty(1 << 16, cp.float32)
    module.get_function("widen")((256,), (256,), (cp.asarray(patterns), bf16, f16, np.int32(1 << 16)))
    for got, dtype in ((bf16, BF16), (f16, np.dtype(np.float16))):
        want = patterns.view(dtype).astype(np.float32)
        got = got.get()
        nan = np.isnan(want)
        assert np.isnan(got[nan]).all()
        np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.integers(0, 1 << 32, 4_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                             np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65520.0, 65519.996, 2.0**-25,
                                       3 * 2.0**-26], dtype=np.float32)])
    n = values.size
    out_bf16, out_f16 = cp.empty(n, cp.uint16), cp.empty(n, cp.uint16)
    module.get_function("narrow")(((n + 255) // 256,), (256,), (cp.asarray(values), out_bf16, out_f16, np.int32(n)))
    with np.errstate(all="ignore"):
        for got, dtype in ((out_bf16, BF16), (out_f16, np.dtype(np.float16))):
            want = values.astype(dtype)
            got = got.get().view(dtype)
            nan = np.isnan(values)
            assert np.isnan(got[nan].astype(np.float32)).all()
            # float32 subnormal inputs are flushed by -ftz=true only in arithmetic, not in cvt
            np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


@pytest.mark.parametrize("flag_dtype", ("bool", "int32", "float32"))
def test_found_inf_device_flag_inside_a_cuda_graph(cp, backend, torch, flag_dtype):
    """found_inf is read on the device: a captured step (capture forbids host synchronisation)
    replays as a no-op while the flag is set and steps when it is cleared."""
    stored, master = host_values(COMBINATIONS[3], 4099, 4)  # bf16 params + master, fp32 moments
    tensors = [to_torch(torch, a) for a in stored]
    master_t = to_torch(torch, master)
    arrays = [backend.as_array(t) for t in tensors]
    master_a = backend.as_array(master_t)
    flag = cp.zeros((), dtype=flag_dtype)
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, maximize=False)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        step = cp.ones((), dtype=cp.int64)
        capturable_step(backend, *[a.copy() for a in arrays], step, 1e-2, master=master_a.copy(),
                                     found_inf=flag, check_finite=True, **options)  # compile, allocate
        stream.synchronize()
        stream.begin_capture()
        capturable_step(backend, *arrays, step, 1e-2, master=master_a, found_inf=flag, check_finite=True,
                                     **options)
        graph = stream.end_capture()
        before = [a.get().tobytes() for a in (*arrays, master_a)]
        flag.fill(1)
        graph.launch(stream)
        stream.synchronize()
        assert [a.get().tobytes() for a in (*arrays, master_a)] == before
        flag.fill(0)
        graph.launch(stream)
        stream.synchronize()
        assert master_a.get().tobytes() != before[4]
        assert arrays[0].get().view(BF16).tobytes() == master_a.get().astype(BF16).tobytes()


def test_found_inf_device_flag_through_fused_step(cp):
    stored, _ = host_values(COMBINATIONS[0], 1000, 5)
    arrays = [cp.asarray(a) for a in stored]
    before = [a.get().tobytes() for a in arrays]
    fastradam.fused_step(*arrays, step=3, found_inf=cp.ones((), dtype=cp.float32))
    assert [a.get().tobytes() for a in arrays] == before
    fastradam.fused_step(*arrays, step=3, found_inf=cp.zeros((), dtype=cp.bool_))
    assert arrays[0].get().tobytes() != before[0]


@pytest.mark.parametrize("bad", (np.nan, np.inf))
@pytest.mark.parametrize("dtype", (np.float32, np.float16))
def test_check_finite_skips_without_a_write(cp, bad, dtype):
    stored, _ = host_values((np.dtype(dtype), np.dtype(dtype), np.dtype(np.float32), None), 70000, 6)
    arrays = [cp.asarray(a) for a in stored]
    arrays[1][69999] = bad
    before = [a.get().tobytes() for a in arrays]
    fastradam.fused_step(*arrays, step=7, check_finite=True)
    assert [a.get().tobytes() for a in arrays] == before
    arrays[1][69999] = 0.5
    twin = [a.copy() for a in arrays]
    fastradam.fused_step(*twin, step=7)
    fastradam.fused_step(*arrays, step=7, check_finite=True)
    assert [a.get().tobytes() for a in arrays] == [a.get().tobytes() for a in twin]


def test_check_finite_layout_and_tensor_lists_on_bf16_torch(torch):
    layout = fastradam.FlatLayout([(100,), (100,), (100,)])
    flats = [to_torch(torch, layout.pack([np.full(100, 0.5)] * 3).astype(BF16)) for _ in range(4)]
    grads = to_numpy(flats[1], BF16)
    grads[100:128] = np.nan  # padding
    grads[128 + 5] = np.nan  # inactive segment
    flats[1] = to_torch(torch, grads)
    before = [to_numpy(f, BF16).tobytes() for f in flats]
    fastradam.fused_step_layout(layout, *flats, steps=[3, 3, 3], has_grad=[True, False, True], check_finite=True)
    assert to_numpy(flats[0], BF16).tobytes() != before[0]
    tensors = [[to_torch(torch, a) for a in host_values(COMBINATIONS[2], n, n)[0]] for n in (5, 300)]
    bad = to_numpy(tensors[1][1], BF16)
    bad[7] = np.inf
    tensors[1][1] = to_torch(torch, bad)
    snapshot = [to_numpy(t, BF16).tobytes() for quad in tensors for t in quad]
    fastradam.fused_step_multi(*[[q[k] for q in tensors] for k in range(4)], steps=[2, 2], check_finite=True)
    assert [to_numpy(t, BF16).tobytes() for quad in tensors for t in quad] == snapshot


def kept_values(storage, n: int, seed: int) -> list[np.ndarray]:
    """Random kernel arrays (bit views) of ``storage``: (p, g, m, v), and the int16 remainders with them."""
    rng = np.random.default_rng([seed, n])
    values = (rng.standard_normal(n), rng.standard_normal(n), 0.1 * rng.standard_normal(n),
              1e-6 + 1e-2 * rng.random(n))
    formats = (storage.params, storage.grads, storage.moments, storage.moments)
    dtypes = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}
    arrays = [numba.as_array(v.astype(dtypes[f])) for v, f in zip(values, formats)]
    return arrays + ([rng.integers(-2**15, 2**15, n, dtype=np.int16)] if storage.remainders else [])


#: The tensor list and the layout of the multi-tensor cases (one skipped piece each).
KEPT_SIZES = (5, 4099, 0, 70000, 17)
KEPT_ROWS = np.array([0, 0, 0, -1, 0], np.int32)


def bind_kept(face, kind: str, arrays: list[list], storage):
    """``face.bind_<kind>`` (the Numba or CUDA backend) over kernel arrays: one flat buffer, one layout
    of KEPT_SIZES, or a list of KEPT_SIZES tensors (each [p, g, m, v] and its remainders)."""
    roles = [[tensor[k] for tensor in arrays] for k in range(len(arrays[0]))]
    side = roles[4] if storage.remainders else None
    if kind == "tensors":
        return functools.partial(face.bind_tensors(*roles[:4], master=side, stochastic=storage.stochastic), KEPT_ROWS)
    (p, g, m, v), master = (r[0] for r in roles[:4]), None if side is None else side[0]
    if kind == "flat":
        return face.bind_flat(p, g, m, v, master=master, stochastic=storage.stochastic)
    layout = fastradam.FlatLayout([(n,) for n in KEPT_SIZES])
    return functools.partial(face.bind_segments(p, g, m, v, layout.arrays, master=master,
                                                stochastic=storage.stochastic), KEPT_ROWS)


@pytest.mark.parametrize("storage", KEEPING, ids=[s.short for s in KEEPING])
@pytest.mark.parametrize("kind", ("flat", "segments", "tensors"))
def test_kept_params_equal_the_numba_backend_bit_for_bit(cp, backend, storage, kind):
    """The device launchers against Numba's on the same data and tables: params, remainders and moments
    bit for bit (stochastic rounding: the same global indices)."""
    hyper = {"step": 40, "lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1,
             "decoupled_weight_decay": False, "maximize": False}
    floats, ints = keeping_tables([(scalars_for(hyper), 40)], storage)
    sizes = {"flat": (2**20 + 3,), "segments": (fastradam.FlatLayout([(n,) for n in KEPT_SIZES]).size,),
             "tensors": KEPT_SIZES}[kind]
    host = [kept_values(storage, n, seed) for seed, n in enumerate(sizes)]
    device = [[cp.asarray(x) for x in tensor] for tensor in host]
    bind_kept(numba, kind, host, storage)(floats, ints)
    bind_kept(backend, kind, device, storage)(floats, ints)
    cp.cuda.get_current_stream().synchronize()
    for want, got in zip(host, device):
        assert [x.tobytes() for x in want] == [x.get().tobytes() for x in got]


def test_device_steps_with_stochastic_rounding_are_refused(cp, backend):
    arrays = [cp.asarray(x) for x in kept_values(next(s for s in KEEPING if s.stochastic), 100, 1)]
    group = check_group({})
    with pytest.raises(ValueError, match="no capturable kernels"):
        backend.radam_step_capturable(*arrays, cp.asarray(np.int64(3)), 1e-3, group, stochastic=True)
