"""Shared test cases: sizes, option sets, storage combinations and fresh random buffers, for every backend's tests."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from fastradam.storage import SUPPORTED, Storage

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
    {"eps_root": 1e-6},
    {"eps_root": 1e-3, "eps": 0.0, "weight_decay": 0.1, "flavour": "optax"},
)

#: The storage combinations every backend's mixed-precision tests run, drawn from
#: :data:`fastradam.storage.SUPPORTED`: the four the kernels were built for first (fp32;
#: bf16 params and grads with fp32 moments; all-bf16; bf16 with an fp32 master), then float16
#: in every role that takes it, the moments' two formats beside each kind of params, and all-float64.
STORAGES: tuple[Storage, ...] = (
    Storage("float32", "float32", "float32"),
    Storage("bfloat16", "bfloat16", "float32"),
    Storage("bfloat16", "bfloat16", "bfloat16"),
    Storage("bfloat16", "bfloat16", "float32", master=True),
    Storage("float16", "float16", "float32"),
    Storage("float16", "float16", "float32", master=True),
    Storage("float16", "bfloat16", "bfloat16", master=True),
    Storage("float32", "bfloat16", "bfloat16"),
    Storage("bfloat16", "float32", "float32"),
    Storage("float64", "float64", "float64"),
)
assert set(STORAGES) <= set(SUPPORTED)
#: The compact-master storages (bfloat16 params; :mod:`fastradam.rounding`), 6 each, tested on their
#: own (tests/test_compact_params.py) since their params keep the fp32 value in another way:
#: int16 remainders beside the params, or stochastic rounding without anything beside them.
REMAINDER_STORAGES: tuple[Storage, ...] = tuple(s for s in SUPPORTED if s.remainders)
STOCHASTIC_STORAGES: tuple[Storage, ...] = tuple(s for s in SUPPORTED if s.stochastic)
#: The NumPy dtype of each storage format.
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
                 "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def numpy_dtypes(storage: Storage) -> tuple[np.dtype, np.dtype, np.dtype, np.dtype | None]:
    """The NumPy dtypes ``(params, grads, moments, master or None)`` of a storage combination."""
    return (NUMPY_DTYPES[storage.params], NUMPY_DTYPES[storage.grads], NUMPY_DTYPES[storage.moments],
            NUMPY_DTYPES["float32"] if storage.master else None)


def random_buffers(size: int, dtype: Any, seed: int) -> tuple[np.ndarray, ...]:
    """Fresh ``(params, grads, exp_avg, exp_avg_sq)``: normal values, ``exp_avg_sq > 0``."""
    rng = np.random.default_rng(seed)
    params = rng.standard_normal(size)
    grads = rng.standard_normal(size) * 10.0 ** rng.uniform(-3, 1, size)
    exp_avg = rng.standard_normal(size) * 0.1
    exp_avg_sq = rng.uniform(1e-6, 1.0, size) ** 2
    return tuple(np.ascontiguousarray(x, dtype=dtype) for x in (params, grads, exp_avg, exp_avg_sq))
