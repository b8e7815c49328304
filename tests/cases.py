"""Shared test cases: sizes, option sets and fresh random buffers, for every backend's tests."""

from __future__ import annotations

from typing import Any

import numpy as np

DTYPES = (np.float32, np.float64)
#: Sizes that hit empty, scalar, vector-tail and multi-thread chunk edges.
SIZES = (0, 1, 3, 15, 16, 17, 1023, 2**20 + 3)
#: Steps 1..5 stay below the rectification threshold with beta2 = 0.999; 6 and later rectify.
STEPS = (1, 2, 5, 6, 7, 100, 10**4)

#: One entry per option, each paired with defaults elsewhere.
OPTION_SETS: tuple[dict[str, Any], ...] = (
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"maximize": True},
    {"maximize": True, "weight_decay": 0.05},
    {"lr": 0.1, "betas": (0.5, 0.99), "eps": 1e-6},
    {"lr": 3e-4, "betas": (0.0, 0.99999), "eps": 0.0},
)


def random_buffers(size: int, dtype: Any, seed: int) -> tuple[np.ndarray, ...]:
    """Fresh ``(params, grads, exp_avg, exp_avg_sq)``: normal values, ``exp_avg_sq > 0``."""
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(size)
    grads = rng.standard_normal(size) * 10.0 ** rng.uniform(-3, 1, size)
    exp_avg = rng.standard_normal(size) * 0.1
    exp_avg_sq = rng.uniform(1e-6, 1.0, size) ** 2
    return tuple(np.ascontiguousarray(x, dtype=dtype) for x in (params, grads, exp_avg, exp_avg_sq))
