"""Numba CPU backend: one parallel, vectorised, in-place pass over NumPy buffers.

One kernel source serves every float dtype and every entry point. Work is cut into blocks
(``start, stop, row``): a flat buffer is one segment cut into :data:`BLOCK`-element blocks; a
multi-tensor layout is its segment table cut the same way; a tensor list is a table of
addresses. Each block reads its scalars from row ``row`` of small tables that the host filled
in float64 and rounded to the buffer dtype (a float32 loop stays float32); ``row < 0`` skips
the block. ``prange`` spreads blocks over ``numba.get_num_threads()`` threads.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic

from fastradam.layout import SegmentArrays, tiles
from fastradam.scalars import HOLD, RECTIFIED

#: Elements per block: 64K float32 is 256 KiB per buffer, enough work to amortise a block's
#: setup and small enough to balance two or more threads on a 1M-element buffer.
BLOCK = 1 << 16


@njit(inline="always")
def _radam_element(p, g, m, v, one_minus_beta1, beta2, one_minus_beta2, eps, l2_weight_decay,
                   param_decay, step_size, negate_grad, mode):
    """One element of the RAdam update (see ``StepScalars``); returns the new ``(p, m, v)``."""
    if negate_grad:
        g = -g
    if l2_weight_decay != 0:
        g = g + l2_weight_decay * p
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * g * g
    if mode == RECTIFIED:
        p = p * param_decay - step_size * m / (np.sqrt(v) + eps)
    elif mode != HOLD:
        p = p * param_decay - step_size * m
    return p, m, v


@njit(inline="always")
def _radam_range(params, grads, exp_avg, exp_avg_sq, start, stop, floats, ints, row):
    """Elements ``start:stop`` with the scalars of table row ``row`` (views, so the index loop
    starts at 0 and LLVM drops the negative-index checks that would block vectorisation)."""
    one_minus_beta1, beta2, one_minus_beta2 = floats[row, 0], floats[row, 1], floats[row, 2]
    eps, l2_weight_decay, param_decay, step_size = floats[row, 3], floats[row, 4], floats[row, 5], floats[row, 6]
    negate_grad, mode = ints[row, 0] != 0, ints[row, 1]
    p_view, g_view = params[start:stop], grads[start:stop]
    m_view, v_view = exp_avg[start:stop], exp_avg_sq[start:stop]
    for i in range(p_view.size):
        p, m, v = _radam_element(p_view[i], g_view[i], m_view[i], v_view[i], one_minus_beta1, beta2,
                                 one_minus_beta2, eps, l2_weight_decay, param_decay, step_size,
                                 negate_grad, mode)
        p_view[i] = p
        m_view[i] = m
        v_view[i] = v


@njit(parallel=True, cache=True, fastmath=False)
def _radam_blocks(params, grads, exp_avg, exp_avg_sq, block_start, block_stop, block_row, floats, ints):
    for b in prange(block_start.size):
        row = block_row[b]
        if row >= 0:
            _radam_range(params, grads, exp_avg, exp_avg_sq, block_start[b], block_stop[b], floats, ints, row)


@intrinsic
def _array_at(typingctx, address, size, like):
    """A 1-D C array of ``like``'s dtype over ``size`` elements at integer ``address``."""
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, size, like), codegen


@njit(parallel=True, cache=True, fastmath=False)
def _radam_tensor_blocks(addresses, sizes, block_start, block_stop, block_tensor, tensor_row, floats, ints, like):
    for b in prange(block_start.size):
        t = block_tensor[b]
        row = tensor_row[t]
        if row >= 0:
            n = sizes[t]
            params = carray(_array_at(addresses[t, 0], n, like), n)
            grads = carray(_array_at(addresses[t, 1], n, like), n)
            exp_avg = carray(_array_at(addresses[t, 2], n, like), n)
            exp_avg_sq = carray(_array_at(addresses[t, 3], n, like), n)
            _radam_range(params, grads, exp_avg, exp_avg_sq, block_start[b], block_stop[b], floats, ints, row)


def blocks(offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(start, stop, segment)`` columns of the :data:`BLOCK`-element tiles of the given ranges."""
    table = tiles(offsets, sizes, BLOCK)
    return tuple(np.ascontiguousarray(table[:, k]) for k in range(3))


@functools.lru_cache(maxsize=16)
def _flat_blocks(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    start, stop, segment = blocks(np.zeros(1, np.int64), np.array([size]))
    for a in (start, stop, segment):
        a.flags.writeable = False
    return start, stop, segment.astype(np.int32)


def as_array(obj: np.ndarray) -> np.ndarray:
    """NumPy arrays are this backend's native arrays."""
    return obj


def check_devices(arrays: list[np.ndarray]) -> None:
    """Host arrays all live in one memory space: nothing to check."""


def radam_step(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
               floats: np.ndarray, ints: np.ndarray) -> None:
    """One RAdam step in place on validated buffers (any shape, flat in memory), with one-row tables."""
    start, stop, row = _flat_blocks(params.size)
    _radam_blocks(params.reshape(-1), grads.reshape(-1), exp_avg.reshape(-1), exp_avg_sq.reshape(-1),
                  start, stop, row, floats, ints)


def radam_step_segments(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                        segments: SegmentArrays, segment_row: np.ndarray, floats: np.ndarray,
                        ints: np.ndarray) -> None:
    """One step over the segments of flat buffers; segment ``i`` uses row ``segment_row[i]`` (< 0: skipped)."""
    if "numba" not in segments.derived:
        segments.derived["numba"] = blocks(segments.offsets, segments.sizes)
    start, stop, segment = segments.derived["numba"]
    _radam_blocks(params, grads, exp_avg, exp_avg_sq, start, stop, segment_row[segment], floats, ints)


def radam_step_tensors(params: list[np.ndarray], grads: list[np.ndarray], exp_avg: list[np.ndarray],
                       exp_avg_sq: list[np.ndarray], tensor_row: np.ndarray, floats: np.ndarray,
                       ints: np.ndarray) -> None:
    """One step over lists of separate tensors: one parallel loop over their address table."""
    if not params:
        return
    addresses = np.array([[a.__array_interface__["data"][0] for a in quad]
                          for quad in zip(params, grads, exp_avg, exp_avg_sq)], dtype=np.int64)
    sizes = np.array([a.size for a in params], dtype=np.int64)
    start, stop, tensor = blocks(np.zeros_like(sizes), sizes)
    _radam_tensor_blocks(addresses, sizes, start, stop, tensor, tensor_row, floats, ints,
                         np.empty(0, dtype=params[0].dtype))
