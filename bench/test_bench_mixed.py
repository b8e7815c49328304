"""Mixed-precision benchmarks: every storage combination beside a same-traffic kernel of its bytes.

The ``dtype`` column names the storage as ``params/grads/moments`` (``+master`` with fp32
master weights); ``bytes_per_element`` is what one step moves for it. ``check_finite`` rows
measure the cost of the read-only gradient pre-pass.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import fastradam
from fastradam.bench.machine import cpu_model
from peers import STEADY_STEP
from roofline import bytes_per_element, same_traffic_step

MEBI = 2**20
BF16, F16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)
SHORT = {BF16: "bf16", F16: "fp16", F32: "fp32"}
#: (params, grads, moments, master)
COMBINATIONS = [
    (F32, F32, F32, None),
    (BF16, BF16, F32, None),
    (BF16, BF16, BF16, None),
    (BF16, BF16, F32, F32),
    (F16, F16, F32, None),
    (F16, F16, F32, F32),
]


#: The issue's four combinations: the default (core) subset; ``--full`` adds the rest.
CORE = COMBINATIONS[:4]


def _label(combo) -> str:
    return "/".join(SHORT[d] for d in combo[:3]) + ("+master" if combo[3] is not None else "")


def _buffers(n: int, combo):
    rng = np.random.default_rng(n)
    values = [rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32),
              rng.standard_normal(n, dtype=np.float32) * np.float32(0.1), rng.random(n, dtype=np.float32)]
    stored = [v.astype(d) for v, d in zip(values, (combo[0], combo[1], combo[2], combo[2]))]
    master = None if combo[3] is None else values[0]
    return stored, master


def _cases():
    cases = []
    for n in (16 * MEBI, 64 * MEBI):
        for combo in COMBINATIONS:
            for implementation in ("fastradam", "same_traffic", "fastradam_check_finite"):
                core = n == 16 * MEBI and combo in CORE and not implementation.endswith("finite")
                marks = [] if core else [pytest.mark.full]
                cases.append(pytest.param(implementation, n, combo, marks=marks,
                                          id=f"{implementation}-{_label(combo)}-{n // MEBI}M"))
    return cases


@pytest.mark.parametrize("implementation,n,combo", _cases())
def test_storage_step(benchmark, implementation, n, combo):
    stored, master = _buffers(n, combo)
    if implementation == "same_traffic":
        def step():
            same_traffic_step(*stored, master)
    else:
        check = implementation.endswith("check_finite")

        def step():
            fastradam.fused_step(*stored, step=STEADY_STEP, master_params=master, check_finite=check)
    benchmark.group = f"{_label(combo)} N={n // MEBI}M"
    benchmark.extra_info.update(
        implementation=implementation, n=n, dtype=_label(combo), device=f"cpu: {cpu_model()}",
        bytes_per_element=bytes_per_element(*stored, master),
    )
    benchmark.pedantic(step, rounds=30 if n <= 16 * MEBI else 10, warmup_rounds=1)
