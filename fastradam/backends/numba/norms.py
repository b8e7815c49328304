"""The Numba backend's gradient-norm pre-pass (:mod:`fastradam.clipping` states the rules).

One read-only pass over the active blocks of a step (the same blocks the update takes) gives each
block's ``sum |g|^p`` (``max |g|`` for inf) in float64; the caller adds the blocks in block order.
Inside a block, element ``i`` goes to lane ``i % LANES`` and the lanes are added in lane order, so
the result does not depend on the thread count. LLVM keeps such a loop scalar (the lanes live in
memory, and it will not reassociate a float sum), which reads float32 gradients at a third of
the bandwidth a plain read reaches; so for float32/float64 gradients and the 2- and 1-norms the
lanes are one ``<LANES x double>`` vector written as LLVM IR (:func:`_vector_lanes`): the same
multiplications and additions in the same order, the same bits.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fastradam.backends.numba.kernels import VECTOR_BITS, _array_at, _threads, set_num_threads
from fastradam.backends.numba.storage import load
from fastradam.backends.numba.target import prefer_vector_width
from fastradam.clipping import LANES
from fastradam.spec import NORM_CODES

_TWO, _ONE, _INF = NORM_CODES["two"], NORM_CODES["one"], NORM_CODES["inf"]


@njit(inline="always")
def _magnitude(value, code, power):
    """``|g|^p`` of a stored value in float64 (for inf: ``|g|``)."""
    g = np.float64(load(value))
    if code == _TWO:
        return g * g
    if code == _ONE or code == _INF:
        return abs(g)
    return abs(g) ** power


def _lane_intrinsic(squares: bool):
    """An intrinsic ``(view, chunks, lanes)``: ``lanes[j] += f(view[k * LANES + j])`` for k in order,
    ``f`` = ``g * g`` (``squares``) or ``|g|``, in float64 (float32 values widened exactly), one
    ``<LANES x double>`` accumulator; ``view`` a contiguous float32/float64 array."""
    @intrinsic
    def lanes_of(typingctx, view, chunks, lanes):
        if not (isinstance(view, types.Array) and view.dtype in (types.float32, types.float64)):
            return None

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            out = context.make_array(signature.args[2])(context, builder, args[2]).data
            element = context.get_value_type(signature.args[0].dtype)
            wide_type = ir.VectorType(ir.DoubleType(), LANES)
            out_vector = builder.bitcast(out, wide_type.as_pointer())
            accumulator = cgutils.alloca_once_value(builder, builder.load(out_vector, align=8))
            chunks_of = builder.bitcast(data, ir.VectorType(element, LANES).as_pointer())
            with cgutils.for_range(builder, args[1]) as loop:
                double = isinstance(element, ir.DoubleType)
                chunk = builder.load(builder.gep(chunks_of, [loop.index]), align=8 if double else 4)
                wide = chunk if double else builder.fpext(chunk, wide_type)
                if squares:
                    term = builder.fmul(wide, wide)
                else:  # |g|: the sign bit cleared (exact)
                    bits_type = ir.VectorType(ir.IntType(64), LANES)
                    mask = ir.Constant(bits_type, [(1 << 63) - 1] * LANES)
                    term = builder.bitcast(builder.and_(builder.bitcast(wide, bits_type), mask), wide_type)
                builder.store(builder.fadd(builder.load(accumulator), term), accumulator)
            builder.store(builder.load(accumulator), out_vector, align=8)
            return context.get_dummy_value()
        return types.void(view, chunks, lanes), codegen
    return lanes_of


_square_lanes, _abs_lanes = _lane_intrinsic(True), _lane_intrinsic(False)


def _add_lanes(view, whole, code, power, lanes):
    """``lanes[j] += |g|^p`` of elements ``j, j + LANES, ...`` below ``whole`` (a multiple of LANES), in order."""


@njit(inline="always")
def _scalar_lanes(view, whole, code, power, lanes):
    for i in range(0, whole, LANES):
        for j in range(LANES):
            lanes[j] += _magnitude(view[i + j], code, power)


@overload(_add_lanes, inline="always")
def _add_lanes_impl(view, whole, code, power, lanes):
    if view.dtype not in (types.float32, types.float64):
        return lambda view, whole, code, power, lanes: _scalar_lanes(view, whole, code, power, lanes)

    def vector(view, whole, code, power, lanes):
        if code == _TWO:
            _square_lanes(view, whole // LANES, lanes)
        elif code == _ONE:
            _abs_lanes(view, whole // LANES, lanes)
        else:
            _scalar_lanes(view, whole, code, power, lanes)
    return vector


@njit(inline="always")
def _block_norm(view, code, power):
    """``sum |g|^p`` (``max |g|``, NaN if any is NaN, for inf) of a block, lane by lane."""
    lanes = np.zeros(LANES)
    whole = view.size - view.size % LANES
    if code == _INF:
        nan = 0
        for i in range(0, whole, LANES):
            for j in range(LANES):
                a = _magnitude(view[i + j], code, power)
                nan += a != a
                lanes[j] = a if a > lanes[j] else lanes[j]
        for i in range(whole, view.size):
            a = _magnitude(view[i], code, power)
            nan += a != a
            lanes[0] = a if a > lanes[0] else lanes[0]
        return np.nan if nan else lanes.max()
    _add_lanes(view, whole, code, power, lanes)
    for i in range(whole, view.size):
        lanes[i - whole] += _magnitude(view[i], code, power)
    total = 0.0
    for j in range(LANES):
        total += lanes[j]
    return total


@njit(parallel=True, cache=True)
def norm_blocks(grads, block_start, block_stop, block_row, code, power, serial):
    """Each active block's :func:`_block_norm` (0 for skipped blocks), float64."""
    threads = _threads(serial)
    partial = np.zeros(block_start.size)
    for b in prange(block_start.size):
        prefer_vector_width(VECTOR_BITS)
        if block_row[b] >= 0:
            partial[b] = _block_norm(grads[block_start[b]:block_stop[b]], code, power)
    set_num_threads(threads)
    return partial


@njit(parallel=True, cache=True)
def norm_tensor_blocks(addresses, block_start, block_stop, block_tensor, tensor_row, g_like, code, power, serial):
    """:func:`norm_blocks` over the blocks of a tensor list (gradients: column 1 of ``addresses``)."""
    threads = _threads(serial)
    partial = np.zeros(block_start.size)
    for b in prange(block_start.size):
        prefer_vector_width(VECTOR_BITS)
        t = block_tensor[b]
        if tensor_row[t] >= 0:
            grads = carray(_array_at(addresses[t, 1], block_stop[b], g_like), block_stop[b])
            partial[b] = _block_norm(grads[block_start[b]:], code, power)
    set_num_threads(threads)
    return partial


def total_of(partial: np.ndarray, code: int) -> float:
    """The blocks' partials added (or their max, NaN if any is NaN, for inf) in block order."""
    if code == _INF:
        return float(np.max(partial)) if partial.size else 0.0
    total = 0.0
    for value in partial.tolist():  # block order, whatever the thread count
        total += value
    return total
