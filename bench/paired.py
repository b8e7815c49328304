"""Paired timing: implementations measured in alternation, so machine drift cancels in the ratios.

On a shared VM the bandwidth drifts by tens of percent between pytest-benchmark cases; timing
fastradam, the same-traffic kernel and the peers round-robin, and taking the median of each
round's ratio, gives a steadier share of the roofline and speedups than separate medians.

Each storage also gets its **compute ceiling**: the step's element rate on cache-resident
buffers (2**19 elements, all threads, the per-call host time of a 1-element step taken off),
as the bandwidth that rate would consume. Where it sits below the memory bandwidth, that
storage is compute-bound on this machine and the same-traffic share cannot reach 1.

Usage: ``python bench/paired.py [--n 16777216] [--rounds 30]``
"""

from __future__ import annotations

import argparse
import time

import ml_dtypes
import numpy as np

import fastradam
from peers import STEADY_STEP, torch_optimizer_step
from roofline import bytes_per_element, same_traffic_step

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
STORAGES = {"fp32": (F32, F32, F32), "bf16/bf16/fp32": (BF16, BF16, F32), "bf16/bf16/bf16": (BF16, BF16, BF16)}


def _time(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _buffers(n: int, storage: tuple[np.dtype, np.dtype, np.dtype]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(n, dtype=np.float32) for _ in range(3)] + [rng.random(n, dtype=np.float32)]
    params, grads, moments = storage
    return [v.astype(d) for v, d in zip(values, (params, grads, moments, moments))]


def compute_ceiling(storage: tuple[np.dtype, np.dtype, np.dtype], n: int = 2**19, calls: int = 400) -> float:
    """Elements per second of the step on cache-resident buffers, host time per call taken off."""
    def per_call(buffers: list[np.ndarray]) -> float:
        fastradam.fused_step(*buffers, step=STEADY_STEP)
        return float(np.median([_time(lambda: fastradam.fused_step(*buffers, step=STEADY_STEP))
                                for _ in range(calls)]))

    return n / (per_call(_buffers(n, storage)) - per_call(_buffers(1, storage)))


def measure(n: int, rounds: int) -> None:
    for label, storage in STORAGES.items():
        buffers = _buffers(n, storage)
        steps = {"fastradam": lambda: fastradam.fused_step(*buffers, step=STEADY_STEP),
                 "same_traffic": lambda: same_traffic_step(*buffers)}
        if label == "fp32":
            for peer in ("torch_adam_fused", "torch_radam_foreach"):
                steps[peer] = torch_optimizer_step(peer, [buffers])
        for step in steps.values():
            step()
        times = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                times[name].append(_time(step))
        t = {name: np.array(v) for name, v in times.items()}
        ours = t["fastradam"]
        line = [f"{label:15s} N={n:,}: fastradam {np.median(ours) * 1e3:.2f} ms "
                f"({bytes_per_element(*buffers) * n / np.median(ours) / 1e9:.1f} GB/s), "
                f"share of same-traffic {np.median(t['same_traffic'] / ours):.2f}"]
        line += [f"{name} {np.median(t[name] / ours):.2f}x" for name in steps if name.startswith("torch")]
        rate = compute_ceiling(storage)
        line.append(f"compute ceiling {rate / 1e9:.1f} G elements/s = "
                    f"{rate * bytes_per_element(*buffers) / 1e9:.0f} GB/s")
        print("; ".join(line), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16 * 2**20, 64 * 2**20])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    for n in args.n:
        measure(n, args.rounds)
