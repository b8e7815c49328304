"""Paired timing: implementations measured in alternation, so machine drift cancels in the ratios.

On a shared VM the bandwidth drifts by tens of percent between pytest-benchmark cases; timing
fastradam, the same-traffic kernel and the peers round-robin, and taking the median of each
round's ratio, gives a steadier share of the roofline and speedups than separate medians.
Mixed-precision storages are also paired with the float32 step, for their speedup over it, and
the compact ways bfloat16 params keep their values (``+remainders``, ``+sr``) with the fp32-master
path (bf16 params and grads, fp32 master and moments, 28 bytes per element).

Each round also times the step on cache-resident buffers (2**19 elements, all threads): the
VM's compute capacity moves too (its two vCPUs are sometimes worth one core, for seconds at a
time), which only matters where the arithmetic, not the memory, can set the pace. The output
gives the share over all rounds and over the rounds whose in-cache step ran within 25 % of the
fastest (the machine at full compute), its 10th percentile and how many rounds reach 0.9 (the
mixed-precision target), and the **compute ceiling**: the fastest in-cache element
rate (a 1-element step's host time taken off) as the bandwidth it would consume. Where the
ceiling sits near or below the memory bandwidth, that storage is compute-bound here.

Usage: ``python bench/paired.py [--n 16777216] [--rounds 30] [--storages fp32 bf16/bf16/bf16+remainders ...]``
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
#: label -> (params, grads, moments dtypes; how the params keep their values: None, "master", "remainders", "sr")
STORAGES = {"fp32": ((F32, F32, F32), None), "bf16/bf16/fp32": ((BF16, BF16, F32), None),
            "bf16/bf16/bf16": ((BF16, BF16, BF16), None),
            "bf16/bf16/fp32+master": ((BF16, BF16, F32), "master"),
            "bf16/bf16/fp32+remainders": ((BF16, BF16, F32), "remainders"),
            "bf16/bf16/bf16+remainders": ((BF16, BF16, BF16), "remainders"),
            "bf16/bf16/bf16+sr": ((BF16, BF16, BF16), "sr")}
#: The storages measured by default (the others with ``--storages``).
DEFAULT_STORAGES = ("fp32", "bf16/bf16/fp32", "bf16/bf16/bf16")
#: The path the compact-master storages are compared with.
MASTER_PATH = "bf16/bf16/fp32+master"


def _time(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _buffers(n: int, storage: tuple[np.dtype, np.dtype, np.dtype]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(n, dtype=np.float32) for _ in range(3)] + [rng.random(n, dtype=np.float32)]
    params, grads, moments = storage
    return [v.astype(d) for v, d in zip(values, (params, grads, moments, moments))]


def _keeping(n: int, keep: str | None) -> dict:
    """``fused_step``'s keywords for how the params keep their values (fresh buffers of ``n`` elements)."""
    if keep == "master":
        return {"master_params": np.random.default_rng(1).standard_normal(n, dtype=np.float32)}
    if keep == "remainders":
        return {"param_remainders": np.random.default_rng(1).integers(-2**15, 2**15, n, dtype=np.int16)}
    return {"stochastic_round_seed": 1234} if keep == "sr" else {}


def _stepper(buffers: list[np.ndarray], keep: dict):
    """The fused step of ``buffers`` (with ``keep``) as a call, and the same-traffic kernel of its bytes."""
    master, remainders = keep.get("master_params"), keep.get("param_remainders")
    return (lambda: fastradam.fused_step(*buffers, step=STEADY_STEP, **keep),
            lambda: same_traffic_step(*buffers, master, remainders))


IN_CACHE = 2**19  #: elements of the cache-resident probe (7-14 MiB: in L2 + L3)
FULL_COMPUTE = 1.25  #: a round is at full compute when its probe is within this factor of the fastest


def _host_time(storage: tuple[np.dtype, np.dtype, np.dtype], keep: str | None, calls: int = 400) -> float:
    """Median time of a 1-element step: the per-call host work (validation, scalars, launch)."""
    step, _ = _stepper(_buffers(1, storage), _keeping(1, keep))
    step()
    return float(np.median([_time(step) for _ in range(calls)]))


def measure(n: int, rounds: int, labels: tuple[str, ...] = DEFAULT_STORAGES) -> None:
    fp32 = _buffers(n, STORAGES["fp32"][0])
    for label in labels:
        storage, keep = STORAGES[label]
        buffers, in_cache = _buffers(n, storage), _buffers(IN_CACHE, storage)
        keeping = _keeping(n, keep)
        ours, same_traffic = _stepper(buffers, keeping)
        steps = {"fastradam": ours, "same_traffic": same_traffic,
                 "in_cache": _stepper(in_cache, _keeping(IN_CACHE, keep))[0]}
        if keep in ("remainders", "sr"):
            master_storage, master_keep = STORAGES[MASTER_PATH]
            baseline, baseline_keep = _buffers(n, master_storage), _keeping(n, master_keep)
            master_bytes = bytes_per_element(*baseline, baseline_keep["master_params"])
            steps["fastradam_master"] = _stepper(baseline, baseline_keep)[0]
        elif label != "fp32":
            steps["fastradam_fp32"] = lambda: fastradam.fused_step(*fp32, step=STEADY_STEP)
        else:
            for peer in ("torch_adam_fused", "torch_radam_foreach"):
                steps[peer] = torch_optimizer_step(peer, [buffers])
        for step in steps.values():
            step()
        times = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                times[name].append(min(_time(step) for _ in range(5)) if name == "in_cache" else _time(step))
        t = {name: np.array(v) for name, v in times.items()}
        ours, share = t["fastradam"], t["same_traffic"] / t["fastradam"]
        full = t["in_cache"] <= FULL_COMPUTE * t["in_cache"].min()
        ceiling = IN_CACHE / (t["in_cache"].min() - _host_time(storage, keep))
        traffic = bytes_per_element(*buffers, keeping.get("master_params"), keeping.get("param_remainders"))
        line = [f"{label:15s} N={n:,}: fastradam {np.median(ours) * 1e3:.2f} ms "
                f"({traffic * n / np.median(ours) / 1e9:.1f} GB/s), "
                f"share of same-traffic {np.median(share):.2f} "
                f"({np.median(share[full]):.2f} in the {full.sum()} of {rounds} rounds at full compute; "
                f"10th percentile {np.percentile(share, 10):.2f}, >= 0.9 in {np.mean(share >= 0.9):.0%} of rounds)"]
        line += [f"{name} {np.median(t[name] / ours):.2f}x" for name in steps if name.startswith("torch")]
        if "fastradam_fp32" in t:
            line.append(f"{np.median(t['fastradam_fp32'] / ours):.2f}x faster than fp32 storage "
                        f"(bytes: {bytes_per_element(*fp32) / traffic:.2f}x)")
        if "fastradam_master" in t:
            line.append(f"{np.median(t['fastradam_master'] / ours):.2f}x faster than the fp32-master path "
                        f"(bytes: {master_bytes / traffic:.2f}x)")
        line.append(f"compute ceiling {ceiling / 1e9:.1f} G elements/s = {ceiling * traffic / 1e9:.0f} GB/s")
        print("; ".join(line), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16 * 2**20, 64 * 2**20])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--storages", nargs="+", choices=list(STORAGES), default=list(DEFAULT_STORAGES))
    args = parser.parse_args()
    for n in args.n:
        measure(n, args.rounds, tuple(args.storages))
