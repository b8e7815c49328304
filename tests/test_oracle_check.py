"""The comparison helper must catch realistic kernel bugs: a check that cannot fail is a defect."""

from __future__ import annotations

import numpy as np
import pytest

from fastradam.backends import numba as numba_backend
from fastradam.scalars import MOMENTUM, pack_rows, step_scalars
from tests.cases import random_buffers
from tests.oracle_check import assert_matches_oracle

HYPER = {"step": 8, "lr": 1e-2, "weight_decay": 0.1}


def _scalars(**changes):
    s = step_scalars(step=8, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                     decoupled_weight_decay=False, maximize=False)
    return s._replace(**changes)


def _check(dtype, scalars):
    buffers = random_buffers(1023, dtype, seed=1)
    buffers[3][:] *= 1e-6  # a small second moment, as early in training: eps and 1-beta2 matter
    before = tuple(b.copy() for b in buffers)
    numba_backend.bind_flat(*buffers)(*pack_rows([scalars], np.dtype(dtype)))
    assert_matches_oracle(before, (buffers[0], buffers[2], buffers[3]), HYPER)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_correct_scalars_pass(dtype):
    _check(dtype, _scalars())


BUGS = {
    "1-beta2 computed in float32 arithmetic": lambda s: {
        "one_minus_beta2": float(np.float32(1) - np.float32(s.beta2))},
    "wrong branch": lambda s: {"mode": MOMENTUM},
    "eps dropped": lambda s: {"eps": 0.0},
    "step size off by 1e-4": lambda s: {"step_size": s.step_size * (1 + 1e-4)},
    "weight decay lost": lambda s: {"l2_weight_decay": 0.0},
    "gradient negated": lambda s: {"negate_grad": True},
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bug", BUGS, ids=list(BUGS))
def test_injected_bugs_are_caught(dtype, bug):
    with pytest.raises(AssertionError, match="differs from the oracle"):
        _check(dtype, _scalars(**BUGS[bug](_scalars())))
