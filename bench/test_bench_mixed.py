"""Mixed-precision benchmarks: every storage combination beside a same-traffic kernel of its bytes.

The ``dtype`` column names the storage as ``params/grads/moments`` (``+master`` with fp32
master weights, ``+remainders`` with int16 remainders, ``+sr`` rounded stochastically);
``bytes_per_element`` is what one step moves for it. ``check_finite`` rows
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
#: (params, grads, moments, how the params keep their values: None, "master", "remainders", "sr")
COMBINATIONS = [
    (F32, F32, F32, None),
    (BF16, BF16, F32, None),
    (BF16, BF16, BF16, None),
    (BF16, BF16, F32, "master"),
    (F16, F16, F32, None),
    (F16, F16, F32, "master"),
    (BF16, BF16, F32, "remainders"),
    (BF16, BF16, BF16, "remainders"),
    (BF16, BF16, F32, "sr"),
    (BF16, BF16, BF16, "sr"),
]


#: The issue's four combinations: the default (core) subset; ``--full`` adds the rest.
CORE = COMBINATIONS[:4]
#: The stochastic-rounding runs' seed.
SEED = 1234


def _label(combo) -> str:
    return "/".join(SHORT[d] for d in combo[:3]) + ("" if combo[3] is None else f"+{combo[3]}")


def _buffers(n: int, combo):
    """The stored buffers and the keeping keywords of ``fused_step`` (master, remainders, seed)."""
    rng = np.random.default_rng(n)
    values = [rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32),
              rng.standard_normal(n, dtype=np.float32) * np.float32(0.1), rng.random(n, dtype=np.float32)]
    stored = [v.astype(d) for v, d in zip(values, (combo[0], combo[1], combo[2], combo[2]))]
    keep = {"master": {"master_params": values[0]},
            "remainders": {"param_remainders": (values[0].view(np.uint32) & 0xFFFF).astype(np.uint16).view(np.int16)},
            "sr": {"stochastic_round_seed": SEED}}.get(combo[3], {})
    return stored, keep


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
    stored, keep = _buffers(n, combo)
    master, remainders = keep.get("master_params"), keep.get("param_remainders")
    if implementation == "same_traffic":
        def step():
            same_traffic_step(*stored, master, remainders)
    else:
        check = implementation.endswith("check_finite")

        def step():
            fastradam.fused_step(*stored, step=STEADY_STEP, check_finite=check, **keep)
    benchmark.group = f"{_label(combo)} N={n // MEBI}M"
    benchmark.extra_info.update(
        implementation=implementation, n=n, dtype=_label(combo), device=f"cpu: {cpu_model()}",
        bytes_per_element=bytes_per_element(*stored, master, remainders),
    )
    benchmark.pedantic(step, rounds=30 if n <= 16 * MEBI else 10, warmup_rounds=1)
