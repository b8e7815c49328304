"""GPU benchmarks: fastradam's CUDA step beside a same-traffic kernel and torch's optimizers, one card.

float32 at 1M..256M elements and float64 at 64M. Each round launches ``iterations`` steps
back to back between two device synchronisations (the benchmark's timer synchronises the
device, then reads the clock), so the median is GPU time per step with launch overhead
amortised. ``extra_info`` follows ``bench/report.py`` (GB/s, share of the same-traffic
kernel and speedups are derived there). Run by ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

import fastradam
from peers import STEADY_STEP, torch_optimizer_step

pytestmark = pytest.mark.gpu  # skipped without a device by the root conftest.py

MEBI = 2**20
CASES = [(n * MEBI, np.float32) for n in (1, 4, 16, 64, 256)] + [(64 * MEBI, np.float64)]
IMPLEMENTATIONS = ("fastradam", "same_traffic", "torch_radam_foreach", "torch_adam_fused")
#: GPU time aimed at per round, and a rough bandwidth to plan the iterations with.
ROUND_SECONDS = 5e-3
PLANNING_BYTES_PER_SECOND = 3e12

#: Reads p, g, m, v and writes p, m, v in place with trivial arithmetic, 16-byte vectors,
#: grid-stride: the bytes of one optimizer step at this card's best rate (the roofline).
SAME_TRAFFIC_SOURCE = r"""
template <typename T>
struct alignas(16) Pack { T lane[16 / sizeof(T)]; };

template <typename T>
__global__ void same_traffic(Pack<T>* p, const Pack<T>* g, Pack<T>* m, Pack<T>* v, long long packs, T scale) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < packs;
         k += (long long)gridDim.x * blockDim.x) {
        Pack<T> pk = p[k], mk = m[k], vk = v[k];
        const Pack<T> gk = g[k];
        for (int j = 0; j < (int)(16 / sizeof(T)); ++j) {
            pk.lane[j] += scale * gk.lane[j];
            mk.lane[j] += scale * gk.lane[j];
            vk.lane[j] += scale * gk.lane[j];
        }
        p[k] = pk;
        m[k] = mk;
        v[k] = vk;
    }
}
"""
_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def synchronized_timer() -> float:
    """Wait for all work on the device (every stream: CuPy's and torch's), then read the clock."""
    import cupy

    cupy.cuda.Device().synchronize()
    return time.perf_counter()


def device_name() -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return f"gpu: {name.decode() if isinstance(name, bytes) else name}"


def fresh_buffers(n: int, dtype) -> tuple:
    import cupy

    rng = cupy.random.default_rng(n)
    params, grads, exp_avg = (rng.standard_normal(n, dtype=dtype) for _ in range(3))
    return params, grads, exp_avg * dtype(0.1), rng.random(n, dtype=dtype) + dtype(1e-6)


def same_traffic_step(buffers: tuple):
    import cupy

    dtype = buffers[0].dtype
    lanes = 16 // dtype.itemsize
    assert buffers[0].size % lanes == 0
    packs = buffers[0].size // lanes
    name = f"same_traffic<{_C_TYPES[dtype]}>"
    kernel = cupy.RawModule(code=SAME_TRAFFIC_SOURCE, options=("--std=c++17",),
                            name_expressions=(name,)).get_function(name)
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    grid = (min(math.ceil(packs / 256), sms * 8),)
    args = (*buffers, np.int64(packs), dtype.type(1e-12))
    return lambda: kernel(grid, (256,), args)


def make_step(implementation: str, buffers: tuple):
    if implementation == "fastradam":
        return lambda: fastradam.fused_step(*buffers, step=STEADY_STEP)
    if implementation == "same_traffic":
        return same_traffic_step(buffers)
    import torch

    # zero-copy CuPy -> torch; kinds are peers.py's without the "torch_" prefix
    return torch_optimizer_step(implementation, [buffers], to_tensor=torch.from_dlpack)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("n,dtype", CASES, ids=[f"{np.dtype(d).name}-{n // MEBI}M" for n, d in CASES])
def test_gpu_step(benchmark, implementation, n, dtype):
    import cupy

    bytes_per_element = 7 * np.dtype(dtype).itemsize
    buffers = fresh_buffers(n, dtype)
    step = make_step(implementation, buffers)
    benchmark.group = f"gpu {np.dtype(dtype).name} N={n // MEBI}M"
    benchmark.extra_info.update(implementation=implementation, n=n, dtype=np.dtype(dtype).name,
                                device=device_name(), bytes_per_element=bytes_per_element)
    # pytest-benchmark has no public per-test timer; this one synchronises the device first.
    benchmark._timer = synchronized_timer
    iterations = max(1, min(200, round(ROUND_SECONDS * PLANNING_BYTES_PER_SECOND / (bytes_per_element * n))))
    benchmark.pedantic(step, rounds=15, iterations=iterations, warmup_rounds=2)
    benchmark.extra_info["tb_per_s"] = bytes_per_element * n / benchmark.stats.stats.median / 1e12
    del step, buffers
    cupy.get_default_memory_pool().free_all_blocks()
    if implementation.startswith("torch"):
        import torch

        torch.cuda.empty_cache()
