"""The same-traffic memory kernel: this machine's roofline for an in-place optimizer step.

It reads params, grads, exp_avg and exp_avg_sq and writes params, exp_avg and exp_avg_sq in
place, with trivial arithmetic, in the same parallel loop shape as the Numba backend. A
write-allocating triad (a = b + s*c) would understate in-place bandwidth on this CPU.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _same_traffic(params, grads, exp_avg, exp_avg_sq, scale):
    for i in prange(params.size):
        g = grads[i]
        params[i] = params[i] + scale * g
        exp_avg[i] = exp_avg[i] + scale * g
        exp_avg_sq[i] = exp_avg_sq[i] + scale * g


def same_traffic_step(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray,
                      exp_avg_sq: np.ndarray) -> None:
    """Move exactly the bytes of one RAdam step (4 reads, 3 in-place writes per element)."""
    _same_traffic(params, grads, exp_avg, exp_avg_sq, params.dtype.type(1e-12))
