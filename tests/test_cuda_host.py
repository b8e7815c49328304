"""The CUDA kernels of kernels/radam.cu, built for the CPU by g++ (tests/cuda_harness.py), against the oracle.

No GPU needed: the same source CuPy compiles runs here block by block and thread by thread,
so its element math, device-side scalars, grid-stride indexing and head/vector/tail split are
checked on every CI run.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuda_harness
from fastradam.scalars import step_scalars
from oracle_check import assert_matches_oracle

pytestmark = pytest.mark.skipif(cuda_harness.compiler() is None, reason="no host C++ compiler (g++ or $CXX)")

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: The CuPy backend's launch shape and deliberately odd ones: one thread, a grid smaller than
#: the work (grid-stride), one larger than the work (idle threads).
GRIDS = ((1, 1), (3, 64), (1056, 256), (5000, 32))


@pytest.fixture(scope="module")
def harness() -> cuda_harness.Harness:
    return cuda_harness.Harness(cuda_harness.build())


def make_buffers(rng: np.random.Generator, dtype: np.dtype, n: int, offsets=(0, 0, 0, 0)) -> tuple:
    """Fresh random (p, g, m, v), each a view starting ``offset`` elements past a 64-byte boundary."""
    values = (rng.standard_normal(n), rng.standard_normal(n), 0.1 * rng.standard_normal(n),
              1e-6 + 1e-2 * rng.random(n))
    buffers = []
    for value, offset in zip(values, offsets):
        raw = np.empty((n + offset) * dtype.itemsize + 64, dtype=np.uint8)
        start = -raw.ctypes.data % 64
        view = raw[start:start + (n + offset) * dtype.itemsize].view(dtype)[offset:]
        view[...] = value
        buffers.append(view)
    return tuple(buffers)


def hyperparameters(step: int, *, weight_decay: float = 0.0, decoupled: bool = False,
                    maximize: bool = False, beta2: float = 0.999) -> dict:
    return dict(step=step, lr=1e-2, betas=(0.9, beta2), eps=1e-8, weight_decay=weight_decay,
                decoupled_weight_decay=decoupled, maximize=maximize)


def run_step(harness, buffers: tuple, hyper: dict, grid: int = 1056, block: int = 256) -> tuple:
    """One kernel step on copies-preserving inputs; returns (before, after)."""
    before = tuple(b.copy() for b in buffers)
    scalars = step_scalars(step=hyper["step"], lr=hyper["lr"], beta1=hyper["betas"][0], beta2=hyper["betas"][1],
                           eps=hyper["eps"], weight_decay=hyper["weight_decay"],
                           decoupled_weight_decay=hyper["decoupled_weight_decay"], maximize=hyper["maximize"])
    harness.step(buffers, scalars, grid, block)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("step", (1, 2, 3, 4, 5, 6, 7, 100, 10**6))
@pytest.mark.parametrize("decay", ("none", "l2", "decoupled"))
@pytest.mark.parametrize("maximize", (False, True))
def test_options_and_branches_match_oracle(harness, dtype, step, decay, maximize):
    rng = np.random.default_rng([step, len(decay), maximize, dtype.itemsize])
    hyper = hyperparameters(step, weight_decay=0.0 if decay == "none" else 0.05,
                            decoupled=decay == "decoupled", maximize=maximize)
    assert step_scalars(step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                        decoupled_weight_decay=False, maximize=False).rectified == (step >= 6)
    before, after = run_step(harness, make_buffers(rng, dtype, 1023, (1,) * 4), hyper)
    assert_matches_oracle(before, after, hyper)


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


@pytest.mark.parametrize("beta1,beta2", BETAS)
@pytest.mark.parametrize("weight_decay,decoupled,maximize", ((0.0, False, False), (0.1, False, True), (0.1, True, False)))
def test_device_scalars_match_host_scalars(harness, beta1, beta2, weight_decay, decoupled, maximize):
    for step in STEPS:
        options = dict(lr=3e-3, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=weight_decay,
                       decoupled_weight_decay=decoupled, maximize=maximize)
        host = step_scalars(step=step, **options)
        device = harness.step_scalars(step=float(step), **options)
        assert (device.rectified, device.negate_grad) == (host.rectified, host.negate_grad), step
        for field in ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "l2_weight_decay",
                      "param_decay", "step_size"):
            want, got = getattr(host, field), getattr(device, field)
            assert abs(got - want) <= 1e-15 * abs(want), (step, field, got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("step_dtype", (np.int32, np.int64, np.float32, np.float64))
@pytest.mark.parametrize("lr_kind", ("host", np.float32, np.float64))
@pytest.mark.parametrize("step", (3, 6, 1000))
def test_capturable_kernel_matches_oracle_and_host_scalar_kernel(harness, dtype, step_dtype, lr_kind, step):
    rng = np.random.default_rng([step, dtype.itemsize])
    lr = 2e-3 if lr_kind == "host" else np.array(2e-3, dtype=lr_kind)
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02, decoupled_weight_decay=True, maximize=True)
    buffers = make_buffers(rng, dtype, 1023, (2,) * 4)
    twin = tuple(b.copy() for b in buffers)
    before = tuple(b.copy() for b in buffers)
    harness.step_capturable(buffers, np.array(step, dtype=step_dtype), lr, grid=3, block=64, **options)
    hyper = dict(step=step, lr=float(lr), betas=(0.9, 0.999), eps=1e-8, weight_decay=0.02,
                 decoupled_weight_decay=True, maximize=True)
    assert_matches_oracle(before, (buffers[0], buffers[2], buffers[3]), hyper)
    run_step(harness, twin, hyper)
    for got, want in zip(buffers, twin):
        np.testing.assert_array_equal(got, want)
