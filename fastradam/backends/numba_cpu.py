"""Numba CPU backend: one parallel, vectorised, in-place pass over NumPy buffers.

One kernel source serves every float dtype: Numba specialises it on the buffer dtype,
and the host scalars are cast to that dtype first so a float32 loop stays float32.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fastradam.scalars import StepScalars


@njit(inline="always")
def _radam_element(p, g, m, v, one_minus_beta1, beta2, one_minus_beta2, eps, l2_weight_decay,
                   param_decay, negate_grad, rectified, step_size):
    """One element of the RAdam update; returns the new ``(p, m, v)``."""
    if negate_grad:
        g = -g
    if l2_weight_decay != 0:
        g = g + l2_weight_decay * p
    p = p * param_decay
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * g * g
    if rectified:
        p = p - step_size * m / (np.sqrt(v) + eps)
    else:
        p = p - step_size * m
    return p, m, v


@njit(parallel=True, cache=True, fastmath=False)
def _radam_kernel(params, grads, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2,
                  eps, l2_weight_decay, param_decay, negate_grad, rectified, step_size):
    for i in prange(params.size):
        p, m, v = _radam_element(params[i], grads[i], exp_avg[i], exp_avg_sq[i], one_minus_beta1,
                                 beta2, one_minus_beta2, eps, l2_weight_decay, param_decay,
                                 negate_grad, rectified, step_size)
        params[i] = p
        exp_avg[i] = m
        exp_avg_sq[i] = v


def as_array(obj: np.ndarray) -> np.ndarray:
    """NumPy arrays are this backend's native arrays."""
    return obj


def check_devices(arrays: list[np.ndarray]) -> None:
    """Host arrays all live in one memory space: nothing to check."""


def radam_step(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray,
               exp_avg_sq: np.ndarray, scalars: StepScalars) -> None:
    """Apply one RAdam step in place to validated, C-contiguous NumPy buffers of one dtype."""
    cast = params.dtype.type
    _radam_kernel(
        params.reshape(-1), grads.reshape(-1), exp_avg.reshape(-1), exp_avg_sq.reshape(-1),
        cast(scalars.one_minus_beta1), cast(scalars.beta2), cast(scalars.one_minus_beta2),
        cast(scalars.eps), cast(scalars.l2_weight_decay), cast(scalars.param_decay),
        scalars.negate_grad, scalars.rectified,
        cast(scalars.step_size),
    )
