"""Multi-tensor benchmarks: 16M parameters as many tensors, one launch per step.

fastradam on a :class:`~fastradam.FlatLayout` (one and four parameter groups) and on a tensor
list, beside torch.optim.RAdam on the very same tensors. The flat 16M cases of
``test_bench_cpu.py`` are the reference (``share of flat fastradam`` in the report).
"""

from __future__ import annotations

import numpy as np
import pytest

import fastradam
from fastradam.bench.machine import cpu_model
from peers import STEADY_STEP, torch_optimizer_step

SPLITS = ((16384, 1024), (1024, 16384))
GROUPS_4 = [{"lr": 1e-3}, {"lr": 2e-3, "weight_decay": 0.01}, {"lr": 5e-4, "betas": (0.8, 0.99)},
            {"lr": 1e-3, "weight_decay": 0.1, "decoupled_weight_decay": True}]


def _tensors(count: int, size: int, dtype=np.float32):
    rng = np.random.default_rng(count)
    return [(rng.standard_normal(size, dtype=dtype), rng.standard_normal(size, dtype=dtype),
             rng.standard_normal(size, dtype=dtype) * dtype(0.1), rng.random(size, dtype=dtype))
            for _ in range(count)]


def _make_step(implementation: str, tensors):
    count = len(tensors)
    steps = np.full(count, STEADY_STEP)
    if implementation.startswith("torch"):
        return torch_optimizer_step(implementation, tensors)
    if implementation == "fastradam_tensor_list":
        lists = [[t[k] for t in tensors] for k in range(4)]
        return lambda: fastradam.fused_step_multi(*lists, steps=steps)
    groups = GROUPS_4 if implementation == "fastradam_4_groups" else [{}]
    layout = fastradam.FlatLayout([t[0].shape for t in tensors], groups=[i % len(groups) for i in range(count)])
    flats = [layout.pack([t[k] for t in tensors]) for k in range(4)]
    return lambda: fastradam.fused_step_layout(layout, *flats, steps=steps, groups=groups)


def _cases():
    cases = []
    for count, size in SPLITS:
        for implementation in ("fastradam", "fastradam_4_groups", "fastradam_tensor_list",
                               "torch_radam_foreach", "torch_radam_loop"):
            core = (count, size) == SPLITS[0] and implementation in ("fastradam", "fastradam_4_groups",
                                                                      "torch_radam_foreach")
            marks = [] if core else [pytest.mark.full]
            cases.append(pytest.param(implementation, count, size, marks=marks,
                                      id=f"{implementation}-{count}x{size}"))
    return cases


@pytest.mark.parametrize("implementation,count,size", _cases())
def test_multi_tensor_step(benchmark, implementation, count, size):
    step = _make_step(implementation, _tensors(count, size))
    benchmark.group = f"float32 N=16M as {count}x{size}"
    benchmark.extra_info.update(
        implementation=implementation, n=count * size, dtype="float32", device=f"cpu: {cpu_model()}",
        bytes_per_element=28, tensors=f"{count}x{size}",
    )
    slow = implementation.startswith("torch") or implementation.endswith("tensor_list")
    benchmark.pedantic(step, rounds=5 if slow else 30, warmup_rounds=1)
