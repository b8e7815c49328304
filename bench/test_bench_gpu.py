"""GPU benchmarks: fastradam's CUDA step beside a same-traffic kernel and torch's optimizers, one card.

float32 at 1M..256M elements and float64 at 64M; then every mixed-precision storage combination
(``test_gpu_storage_step``: ``dtype`` is ``params/grads/moments[+master]``, bytes per element
fp32 28, bf16/bf16/fp32 22, bf16 everywhere 14, bf16/bf16/fp32+master 28: the kernel reads the
master instead of the bf16 params) beside a same-traffic kernel of exactly its bytes, and with
``check_finite`` (the cost of the read-only gradient pre-pass). Each round launches ``iterations`` steps
back to back between two device synchronisations (the benchmark's timer synchronises the
device, then reads the clock), so the median is the time per step of a loop of calls: the
larger of the GPU time and the host time of one call (~0.1 ms of Python on the lent machine).
``fastradam_graph`` is the same step captured once in a CUDA graph and replayed: device time
alone, what a graph-captured training step sees, and the kernel against the roofline where a
plain call is host-bound (float32 at 1M-4M, 16-bit storage at 16M). ``extra_info`` follows :mod:`fastradam.bench.results` (GB/s, share of the same-traffic
kernel and speedups are derived there). Run by ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

import fastradam
from fastradam.storage import Storage
from peers import STEADY_STEP, torch_optimizer_step

pytestmark = pytest.mark.gpu  # skipped without a device by the root conftest.py

MEBI = 2**20
CASES = [(n * MEBI, np.float32) for n in (1, 4, 16, 64, 256)] + [(64 * MEBI, np.float64)]
IMPLEMENTATIONS = ("fastradam", "fastradam_graph", "same_traffic", "torch_radam_foreach", "torch_adam_fused")
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


def graph_replay(step):
    """``step`` captured once in a CUDA graph (on a fresh stream, torch's current stream too, so a
    call on torch tensors needs no cross-stream event); returns a replay of it."""
    import cupy
    import torch

    cupy.cuda.Device().synchronize()  # the buffers' initialisation, queued on other streams
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream, torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr)):
        step()  # compiles and allocates outside the capture
        stream.synchronize()
        stream.begin_capture()
        step()
        graph = stream.end_capture()
    return lambda: graph.launch(stream)


def make_step(implementation: str, buffers: tuple):
    if implementation == "fastradam":
        return lambda: fastradam.fused_step(*buffers, step=STEADY_STEP)
    if implementation == "fastradam_graph":
        return graph_replay(lambda: fastradam.fused_step(*buffers, step=STEADY_STEP))
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


# --- Mixed precision: every storage combination beside a same-traffic kernel of its bytes ---------

#: Reads and writes exactly the bytes of one step of storage (P, G, Mo, master): g, m, v and p (or
#: the master instead), then p, m, v (and the master), in packs of kLanes elements per role (16
#: bytes of the narrowest role), with trivial integer/float arithmetic that keeps every load live.
MIXED_SAME_TRAFFIC_SOURCE = r"""
template <typename T, int L>
struct alignas(16) Pack { T lane[L]; };

template <typename T, typename S>
__device__ __forceinline__ T bump(T x, S y, int zero) { return x + static_cast<T>(y * zero); }

template <typename P, typename G, typename Mo, bool kMaster, int L>
__global__ void mixed_same_traffic(Pack<P, L>* p, const Pack<G, L>* g, Pack<Mo, L>* m, Pack<Mo, L>* v,
                                   Pack<float, L>* w, long long packs, int zero) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < packs;
         k += (long long)gridDim.x * blockDim.x) {
        Pack<Mo, L> mk = m[k], vk = v[k];
        const Pack<G, L> gk = g[k];
        Pack<P, L> pk;
        Pack<float, L> wk;
        if (kMaster) wk = w[k]; else pk = p[k];
        for (int j = 0; j < L; ++j) {
            mk.lane[j] = bump(mk.lane[j], gk.lane[j], zero);
            vk.lane[j] = bump(vk.lane[j], gk.lane[j], zero);
            if (kMaster) {
                wk.lane[j] = bump(wk.lane[j], gk.lane[j], zero);
                pk.lane[j] = static_cast<P>(static_cast<int>(wk.lane[j]) * zero);
            } else {
                pk.lane[j] = bump(pk.lane[j], gk.lane[j], zero);
            }
        }
        if (kMaster) w[k] = wk;
        p[k] = pk;
        m[k] = mk;
        v[k] = vk;
    }
}
"""
#: (params, grads, moments, master): the issue's four first, then float16.
MIXED = [
    ("float32", "float32", "float32", False),
    ("bfloat16", "bfloat16", "float32", False),
    ("bfloat16", "bfloat16", "bfloat16", False),
    ("bfloat16", "bfloat16", "float32", True),
    ("float16", "float16", "float32", False),
    ("float16", "float16", "float32", True),
]
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_BIT_TYPES = {"float32": "float", "bfloat16": "unsigned short", "float16": "unsigned short"}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def mixed_label(combo) -> str:
    return "/".join(_SHORT[name] for name in combo[:3]) + ("+master" if combo[3] else "")


def mixed_bytes_per_element(combo) -> int:
    """Bytes one step moves per element (:attr:`fastradam.storage.Storage.step_bytes`)."""
    return Storage(*combo[:3], bool(combo[3])).step_bytes


def mixed_buffers(n: int, combo):
    """torch CUDA tensors of the combination (bfloat16 has no CuPy dtype) and the fp32 master."""
    import torch

    generator = torch.Generator(device="cuda").manual_seed(n)
    values = [torch.randn(n, device="cuda", generator=generator) for _ in range(3)]
    values.append(torch.rand(n, device="cuda", generator=generator) + 1e-6)
    values[2] *= 0.1
    roles = (combo[0], combo[1], combo[2], combo[2])
    tensors = [x.to(getattr(torch, name)) for x, name in zip(values, roles)]
    return tensors, (values[0].clone() if combo[3] else None)


def mixed_same_traffic_step(tensors, master, combo):
    import cupy

    from fastradam.backends.cuda import as_array

    arrays = [as_array(t) for t in tensors]
    lanes = 16 // min(_ITEMSIZE[name] for name in combo[:3])
    n = arrays[0].size
    assert n % lanes == 0
    packs = n // lanes
    types = ", ".join(_BIT_TYPES[name] for name in (combo[0], combo[1], combo[2]))
    name = f"mixed_same_traffic<{types}, {'true' if combo[3] else 'false'}, {lanes}>"
    kernel = cupy.RawModule(code=MIXED_SAME_TRAFFIC_SOURCE, options=("--std=c++17",),
                            name_expressions=(name,)).get_function(name)
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    grid = (min(math.ceil(packs / 256), sms * 8),)
    args = (*arrays, np.uint64(0) if master is None else as_array(master), np.int64(packs), np.int32(0))
    return lambda: kernel(grid, (256,), args)


MIXED_IMPLEMENTATIONS = ("fastradam", "fastradam_graph", "same_traffic", "fastradam_check_finite")


@pytest.mark.parametrize("implementation", MIXED_IMPLEMENTATIONS)
@pytest.mark.parametrize("n", (16 * MEBI, 256 * MEBI), ids=lambda n: f"{n // MEBI}M")
@pytest.mark.parametrize("combo", MIXED, ids=mixed_label)
def test_gpu_storage_step(benchmark, implementation, n, combo):
    import cupy
    import torch

    tensors, master = mixed_buffers(n, combo)
    if implementation == "same_traffic":
        step = mixed_same_traffic_step(tensors, master, combo)
    else:
        check = implementation.endswith("check_finite")

        def step():
            fastradam.fused_step(*tensors, step=STEADY_STEP, master_params=master, check_finite=check)
        if implementation == "fastradam_graph":
            step = graph_replay(step)
    bytes_per_element = mixed_bytes_per_element(combo)
    benchmark.group = f"gpu {mixed_label(combo)} N={n // MEBI}M"
    benchmark.extra_info.update(implementation=implementation, n=n, dtype=mixed_label(combo),
                                device=device_name(), bytes_per_element=bytes_per_element)
    benchmark._timer = synchronized_timer
    iterations = max(1, min(200, round(ROUND_SECONDS * PLANNING_BYTES_PER_SECOND / (bytes_per_element * n))))
    benchmark.pedantic(step, rounds=15, iterations=iterations, warmup_rounds=2)
    benchmark.extra_info["tb_per_s"] = bytes_per_element * n / benchmark.stats.stats.median / 1e12
    del step, tensors, master
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()
