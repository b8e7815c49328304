"""Host time per call of each entry point: what a step costs before the device does any work.

A step on a small buffer is bound by the Python between the call and the launch (validation,
scalars, argument packing); this measures that time per input kind and entry point, beside the
bare CuPy launch of the same kernel (the floor) and torch's optimizers, and with ``--profile``
prints where the time goes (cProfile, top functions by own time).

Usage: ``python bench/host_overhead.py [--calls 2000] [--profile]`` (CUDA cases only with a GPU).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import Callable

import numpy as np

import fastradam
import fastradam.torch

N = 4096
TENSORS = 64


def per_call_us(step: Callable[[], None], calls: int, sync: Callable[[], None]) -> float:
    """Median over 5 repeats of the mean host time per call of ``calls`` calls (device synced after)."""
    for _ in range(20):
        step()
    sync()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return 1e6 * float(np.median(times))


def cpu_cases() -> dict[str, Callable[[], None]]:
    rng = np.random.default_rng(0)
    flat = [rng.standard_normal(N, dtype=np.float32) for _ in range(3)] + [rng.random(N, dtype=np.float32)]
    return {"numpy flat fp32": lambda: fastradam.fused_step(*flat, step=10)}


def cuda_cases() -> dict[str, Callable[[], None]]:
    import cupy
    import torch

    from fastradam.backends import cuda

    rng = cupy.random.default_rng(0)
    flat = [rng.standard_normal(N, dtype=np.float32) for _ in range(3)] + [rng.random(N, dtype=np.float32)]
    tensors = [torch.from_dlpack(a) for a in flat]
    bf16 = [tensors[0].bfloat16(), tensors[1].bfloat16(), tensors[2].clone(), tensors[3].clone()]
    layout = fastradam.FlatLayout([(N // TENSORS,)] * TENSORS)
    lists = [[a[i * (N // TENSORS):(i + 1) * (N // TENSORS)] for i in range(TENSORS)] for a in flat]
    steps = np.full(TENSORS, 10)

    storage = cuda.storage_of_arrays(flat[0], flat[1], flat[2])
    kernel = cuda._kernel(0, storage, cuda.step_kernel_name(storage))
    row = (*np.ones(8, np.float32), np.int32(0), np.int32(0))
    grid = cuda._grid(N, storage.lanes, 0)
    launch_args = (*flat, np.uint64(0), np.int64(N), *row, np.uint64(0), np.int32(0))

    params = [torch.nn.Parameter(torch.randn(N // TENSORS, device="cuda")) for _ in range(TENSORS)]
    for p in params:
        p.grad = torch.randn_like(p)
    wrapper = fastradam.torch.RAdam(params, lr=1e-3)
    wrapper.zero_grad(set_to_none=False)  # gradients become views of one flat buffer
    for p in params:
        p.grad.normal_()
    peers = {kind: torch.optim.Adam(params, fused=True) if kind == "fused" else torch.optim.RAdam(params, foreach=True)
             for kind in ("fused", "foreach")}

    return {
        "bare CuPy launch (floor)": lambda: kernel((grid,), (cuda.BLOCK,), launch_args),
        "cupy flat fp32": lambda: fastradam.fused_step(*flat, step=10),
        "cupy flat fp32 check_finite": lambda: fastradam.fused_step(*flat, step=10, check_finite=True),
        "torch flat fp32": lambda: fastradam.fused_step(*tensors, step=10),
        "torch flat bf16/bf16/fp32": lambda: fastradam.fused_step(*bf16, step=10),
        f"cupy layout {TENSORS} segments": lambda: fastradam.fused_step_layout(layout, *flat, steps=steps),
        f"cupy multi {TENSORS} tensors": lambda: fastradam.fused_step_multi(*lists, steps=steps),
        f"fastradam.torch.RAdam {TENSORS} params": wrapper.step,
        f"torch Adam fused {TENSORS} params": peers["fused"].step,
        f"torch RAdam foreach {TENSORS} params": peers["foreach"].step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="cProfile the flat CuPy and torch-bf16 calls")
    args = parser.parse_args()
    cases = cpu_cases()
    sync = lambda: None  # noqa: E731
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount():
            cases.update(cuda_cases())
            sync = cupy.cuda.Device().synchronize
    except Exception as error:  # no CuPy, no driver or no device: CPU cases only
        print(f"(CUDA cases skipped: {type(error).__name__}: {error})")
    print(f"host time per call, N={N} ({TENSORS} tensors where listed), median of 5 x {args.calls} calls")
    for name, step in cases.items():
        print(f"  {name:<40} {per_call_us(step, args.calls, sync):8.1f} us")
    if args.profile:
        for name in ("cupy flat fp32", "torch flat bf16/bf16/fp32", f"cupy layout {TENSORS} segments",
                     f"cupy multi {TENSORS} tensors", f"fastradam.torch.RAdam {TENSORS} params"):
            if name in cases:
                profiler = cProfile.Profile()
                profiler.runcall(lambda: [cases[name]() for _ in range(args.calls)])
                print(f"\n== {name}: top functions by own time over {args.calls} calls")
                pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
