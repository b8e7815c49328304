"""The same-traffic memory kernel: this machine's roofline for an in-place optimizer step.

It reads params, grads, exp_avg, exp_avg_sq (and fp32 master weights or int16 remainders, when
given) and writes params, exp_avg, exp_avg_sq (and the master or remainders) in place, with trivial integer arithmetic on the
raw bits, in the same parallel loop shape as the Numba backend: the bytes of the step, none of
its math. A write-allocating triad (a = b + s*c) would understate in-place bandwidth on this CPU.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from fastradam.storage import FORMAT_OF_VIEW, check_storage

_BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _format(array: np.ndarray) -> str:
    """The storage format of an array or of its kernel bit view."""
    return FORMAT_OF_VIEW.get(array.dtype, array.dtype.name)


def _bits(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1).view(_BITS[array.dtype.itemsize])


@njit(parallel=True, cache=True)
def _same_traffic(params, grads, exp_avg, exp_avg_sq):
    for i in prange(params.size):
        flip = grads[i] & 1
        params[i] ^= flip
        exp_avg[i] ^= flip
        exp_avg_sq[i] ^= flip


@njit(parallel=True, cache=True)
def _same_traffic_master(params, grads, exp_avg, exp_avg_sq, master):
    for i in prange(params.size):
        flip = grads[i] & 1
        master[i] ^= flip
        params[i] = master[i] >> 16  # write the 16-bit copy without reading it, as the step does
        exp_avg[i] ^= flip
        exp_avg_sq[i] ^= flip


@njit(parallel=True, cache=True)
def _same_traffic_remainders(params, grads, exp_avg, exp_avg_sq, remainders):
    for i in prange(params.size):
        flip = grads[i] & 1
        params[i] ^= flip  # read and written, as the step reads and writes both halves of the master
        remainders[i] ^= flip
        exp_avg[i] ^= flip
        exp_avg_sq[i] ^= flip


def same_traffic_step(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                      master: np.ndarray | None = None, remainders: np.ndarray | None = None) -> None:
    """Move exactly the bytes of one RAdam step of these buffers (their storage, any dtype)."""
    buffers = [_bits(a) for a in (params, grads, exp_avg, exp_avg_sq)]
    if master is not None:
        _same_traffic_master(*buffers, _bits(master))
    elif remainders is not None:
        _same_traffic_remainders(*buffers, _bits(remainders))
    else:
        _same_traffic(*buffers)


@njit(parallel=True, cache=True)
def _same_traffic_read(grads):
    folded = 0
    for i in prange(grads.size):
        folded += grads[i] & 1
    return folded


def same_traffic_read(grads: np.ndarray) -> int:
    """Read every byte of ``grads`` once (a reduction of their bits): the clipping pre-pass's traffic."""
    return int(_same_traffic_read(_bits(grads)))


def bytes_per_element(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                      master: np.ndarray | None = None, remainders: np.ndarray | None = None) -> int:
    """Bytes one step moves per element (:attr:`fastradam.storage.Storage.step_bytes`)."""
    return check_storage(tuple(_format(a) for a in (params, grads, exp_avg, exp_avg_sq)),
                         master=None if master is None else _format(master),
                         remainders=None if remainders is None else remainders.dtype.name).step_bytes
