"""CPU benchmarks: fastradam (Numba) beside its roofline and its peers, on the same data.

``pytest bench`` runs the default matrix (float32 at 1M, 16M, 64M; the torch peers up to 16M);
``--full`` adds float64, the peers at 64M and the slow torch loop at every size. Each case records the ``extra_info`` that
:mod:`fastradam.bench.results` turns into GB/s, the share of the same-traffic kernel and speedups.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastradam
from fastradam.bench.machine import cpu_model
from fastradam.reference import reference_step
from peers import STEADY_STEP, torch_optimizer_step
from roofline import bytes_per_element, same_traffic_step

MEBI = 2**20
SIZES = (1 * MEBI, 16 * MEBI, 64 * MEBI)


def _fresh_buffers(n: int, dtype) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(n)
    params, grads, exp_avg = (rng.standard_normal(n, dtype=dtype) for _ in range(3))
    exp_avg_sq = rng.random(n, dtype=dtype)
    return params, grads, exp_avg * dtype(0.1), exp_avg_sq


def _make_step(implementation: str, buffers):
    if implementation == "fastradam":
        return lambda: fastradam.fused_step(*buffers, step=STEADY_STEP)
    if implementation == "same_traffic":
        return lambda: same_traffic_step(*buffers)
    if implementation == "oracle":
        return lambda: reference_step(*buffers, step=STEADY_STEP)
    return torch_optimizer_step(implementation, [buffers])


def _cases():
    cases = []
    for dtype in (np.float32, np.float64):
        for n in SIZES:
            for implementation in ("fastradam", "same_traffic", "torch_adam_fused",
                                   "torch_radam_foreach", "torch_radam_loop", "oracle"):
                if implementation == "oracle" and n > MEBI:
                    continue  # the float64 oracle is a baseline, not a contender
                slow = implementation == "torch_radam_loop" and n > MEBI
                peer_at_64m = implementation.startswith("torch") and n > 16 * MEBI
                full = dtype is np.float64 or slow or peer_at_64m
                marks = [pytest.mark.full] if full else []
                cases.append(pytest.param(implementation, n, dtype, marks=marks,
                                          id=f"{implementation}-{np.dtype(dtype).name}-{n // MEBI}M"))
    return cases


@pytest.mark.parametrize("implementation,n,dtype", _cases())
def test_step(benchmark, implementation, n, dtype):
    buffers = _fresh_buffers(n, dtype)
    step = _make_step(implementation, buffers)
    benchmark.group = f"{np.dtype(dtype).name} N={n // MEBI}M"
    benchmark.extra_info.update(
        implementation=implementation, n=n, dtype=np.dtype(dtype).name, device=f"cpu: {cpu_model()}",
        bytes_per_element=bytes_per_element(*buffers[:4]),
    )
    benchmark.pedantic(step, rounds=_rounds(implementation, n), warmup_rounds=1)


def _rounds(implementation: str, n: int) -> int:
    """Enough rounds for a stable median at about a second per case, at least 5."""
    slow = implementation.startswith("torch_radam") or implementation == "oracle"
    return max(5, min(60, (2 if slow else 60) * MEBI * 16 // n))
