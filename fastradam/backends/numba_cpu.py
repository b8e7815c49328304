"""Numba CPU backend: one parallel, vectorised, in-place pass over NumPy buffers.

One kernel source serves every storage format and every entry point. Work is cut into blocks
(``start, stop, row``): a flat buffer is one segment cut into :data:`BLOCK`-element blocks; a
multi-tensor layout is its segment table cut the same way; a tensor list is a table of
addresses. Each block reads its scalars from row ``row`` of small tables that the host filled
in float64 and rounded to the math dtype (a float32 loop stays float32); ``row < 0`` skips
the block. ``prange`` spreads blocks over ``numba.get_num_threads()`` threads. The common
step (rectified, no gradient scale, no ``maximize``, no L2 decay) runs a loop of its own with
those flags as constants: the same results with fewer instructions per element, which even a
memory-bound step feels (fp32 16M: 0.87 -> 0.96 of the same-traffic kernel on a Zen 3 VM,
paired). Each kernel asks LLVM for :data:`VECTOR_BITS`-wide vectors
(:mod:`fastradam.backends.numba_target`): the CPU's widest, also on Intel server cores whose
tuning alone would take 256 bits.

Storage: float32/float64 buffers are used as they are; bfloat16 and float16 buffers arrive as
``uint16``/``int16`` bit views (see :mod:`fastradam.backends.numba_storage`) and are widened
to float32 for the math and rounded back (nearest-even) on store. With fp32 master weights the
step reads and writes the master and writes the rounded 16-bit copy in the same pass. Numba
specialises the kernel on the buffers' types (and on ``master`` being None), so each storage
combination is its own vectorised loop. When all four buffers are bfloat16 the loop takes two
elements per 32-bit word (same arithmetic, same roundings, bit for bit): widening and narrowing
16-bit lanes costs about as much as the step's arithmetic, and that storage is the one where
the arithmetic, not the memory, can set the pace (8 % faster on cache-resident buffers). On
CPUs with AVX512-BF16 its words go 16 at a time through explicit vector code traced from
:func:`_radam_element` (:mod:`fastradam.backends.numba_lanes`: the hardware rounding where it
is exact, 1.40x faster again on cache-resident buffers); the last few words take the loop here.
"""

from __future__ import annotations

import functools
import sys
from typing import Sequence

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload

from fastradam.backends import numba_lanes
from fastradam.backends.numba_storage import (
    BFLOAT16_BITS,
    FLOAT16_BITS,
    bfloat16_pair,
    bfloat16_word,
    is_finite,
    load,
    store,
)
from fastradam.backends.numba_target import prefer_vector_width
from fastradam.layout import SegmentArrays, tiles
from fastradam.scalars import HOLD, RECTIFIED

#: Elements per block: 64K float32 is 256 KiB per buffer, enough work to amortise a block's
#: setup and small enough to balance two or more threads on a 1M-element buffer.
BLOCK = 1 << 16
#: The vector width the kernels ask LLVM for (:func:`prefer_vector_width`): 512 bits where the
#: CPU has them, also where LLVM's tuning prefers 256 (Sapphire/Emerald Rapids; the in-cache
#: float32 step ran 1.2x faster with 512 on Emerald Rapids), the CPU's widest elsewhere, and
#: LLVM's 256 on the cores that downclock under 512-bit work (``numba_target.DOWNCLOCKING_CORES``).
VECTOR_BITS = 512
#: The bit-view dtype each 16-bit storage format travels as.
BIT_VIEWS = {"bfloat16": BFLOAT16_BITS, "float16": FLOAT16_BITS}


@njit(inline="always")
def _radam_element(p, g, m, v, scalars):
    """One element of the RAdam update (see ``StepScalars``); returns the new ``(p, m, v)``."""
    (one_minus_beta1, beta2, one_minus_beta2, eps, l2_weight_decay, param_decay, step_size, inv_grad_scale,
     negate_grad, mode) = scalars
    g = g * inv_grad_scale
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


def _window(array, start, stop):
    """``array[start:stop]``, or None for a missing (None) master."""


@overload(_window, inline="always")
def _window_impl(array, start, stop):
    if isinstance(array, types.NoneType):
        return lambda array, start, stop: None
    return lambda array, start, stop: array[start:stop]


def _load_param(params, master, i):
    """The parameter in math type: from the fp32 master when there is one."""


@overload(_load_param, inline="always")
def _load_param_impl(params, master, i):
    if isinstance(master, types.NoneType):
        return lambda params, master, i: load(params[i])
    return lambda params, master, i: master[i]


def _store_param(params, master, i, value):
    """Store the new parameter: into the master (fp32) and its rounded copy, or into params."""


@overload(_store_param, inline="always")
def _store_param_impl(params, master, i, value):
    if isinstance(master, types.NoneType):
        def store_params(params, master, i, value):
            params[i] = store(value, params)
        return store_params

    def store_both(params, master, i, value):
        master[i] = np.float32(value)
        params[i] = store(value, params)
    return store_both


@njit(inline="always")
def _radam_at(p_view, g_view, m_view, v_view, master_view, i, scalars):
    """Element ``i`` of the views, loaded, updated and stored back in its own storage."""
    p, m, v = _radam_element(_load_param(p_view, master_view, i), load(g_view[i]), load(m_view[i]),
                             load(v_view[i]), scalars)
    _store_param(p_view, master_view, i, p)
    m_view[i] = store(m, m_view)
    v_view[i] = store(v, v_view)


@njit(inline="never")
def _radam_single(p_view, g_view, m_view, v_view, master_view, i, scalars):
    """:func:`_radam_at` as a call, for the lone head and tail elements of the word loop. Numba
    0.68's IR inliner miscompiles :func:`_radam_at` inlined there (on the tensor-list path an
    element's moment update was lost); a call is also all that one element needs."""
    _radam_at(p_view, g_view, m_view, v_view, master_view, i, scalars)


def _plain(scalars):
    """``scalars`` with the defaults of a plain rectified step as constants, so LLVM folds them
    away (``g * 1``, ``-g``, ``l2 * p``, the update-mode branches): the same results, fewer
    instructions per element. Valid where :func:`_is_plain`."""


@overload(_plain, inline="always")
def _plain_impl(scalars):
    real = scalars[0]

    def plain(scalars):
        (one_minus_beta1, beta2, one_minus_beta2, eps, _, param_decay, step_size, _, _, _) = scalars
        return (one_minus_beta1, beta2, one_minus_beta2, eps, real(0.0), param_decay, step_size, real(1.0),
                False, RECTIFIED)
    return plain


@njit(inline="always")
def _is_plain(scalars):
    """Whether the step is rectified, unscaled, not negated, without L2 decay (the common case)."""
    return scalars[9] == RECTIFIED and not scalars[8] and scalars[4] == 0 and scalars[7] == 1


@njit(inline="always")
def _radam_elements(p_view, g_view, m_view, v_view, master_view, scalars):
    """Every element of the views, one at a time (the loop LLVM vectorises): a loop of its own
    for the common case (:func:`_plain`), a general one for the rest."""
    if _is_plain(scalars):
        _radam_element_loop(p_view, g_view, m_view, v_view, master_view, _plain(scalars))
    else:
        _radam_element_loop(p_view, g_view, m_view, v_view, master_view, scalars)


@njit(inline="always")
def _radam_element_loop(p_view, g_view, m_view, v_view, master_view, scalars):
    for i in range(p_view.size):
        _radam_at(p_view, g_view, m_view, v_view, master_view, i, scalars)


@intrinsic
def _radam_word_vectors(typingctx, p_words, g_words, m_words, v_words, scalars):
    """The explicit AVX-512 loop of :mod:`fastradam.backends.numba_lanes` over the leading words,
    :func:`_radam_element` traced into it; returns how many words it stepped."""
    def codegen(context, builder, signature, args):
        return numba_lanes.emit_word_vectors(context, builder, signature, args, _radam_element.py_func)

    return types.intp(p_words, g_words, m_words, v_words, scalars), codegen


def _leading_word_vectors(p_words, g_words, m_words, v_words, scalars):
    """Step the leading words 16 at a time where the CPU can (see ``numba_lanes``); return how many."""


@overload(_leading_word_vectors, inline="always")
def _leading_word_vectors_impl(p_words, g_words, m_words, v_words, scalars):
    if numba_lanes.available() and all(a.layout == "C" for a in (p_words, g_words, m_words, v_words)):
        return lambda p_words, g_words, m_words, v_words, scalars: _radam_word_vectors(
            p_words, g_words, m_words, v_words, scalars)
    return lambda p_words, g_words, m_words, v_words, scalars: 0


@njit(inline="always")
def _radam_bfloat16_words(p_words, g_words, m_words, v_words, scalars):
    """bfloat16 buffers two elements at a time, as 32-bit words: the same element updates, the
    leading words 16 at a time in explicit vector code where the CPU has it."""
    done = _leading_word_vectors(p_words, g_words, m_words, v_words, scalars)
    _radam_word_pairs(p_words[done:], g_words[done:], m_words[done:], v_words[done:], scalars)


@njit(inline="always")
def _radam_word_pairs(p_words, g_words, m_words, v_words, scalars):
    """The words one at a time, each as its two elements (the loop LLVM vectorises), the
    common case (:func:`_plain`) in a loop of its own."""
    if _is_plain(scalars):
        _radam_word_pair_loop(p_words, g_words, m_words, v_words, _plain(scalars))
    else:
        _radam_word_pair_loop(p_words, g_words, m_words, v_words, scalars)


@njit(inline="always")
def _radam_word_pair_loop(p_words, g_words, m_words, v_words, scalars):
    for k in range(p_words.size):
        p0, p1 = bfloat16_pair(p_words[k])
        g0, g1 = bfloat16_pair(g_words[k])
        m0, m1 = bfloat16_pair(m_words[k])
        v0, v1 = bfloat16_pair(v_words[k])
        p0, m0, v0 = _radam_element(p0, g0, m0, v0, scalars)
        p1, m1, v1 = _radam_element(p1, g1, m1, v1, scalars)
        p_words[k] = bfloat16_word(p0, p1)
        m_words[k] = bfloat16_word(m0, m1)
        v_words[k] = bfloat16_word(v0, v1)


def _radam_views(p_view, g_view, m_view, v_view, master_view, scalars):
    """Update the views in place: element by element, or by bfloat16 pairs where they can be."""


@overload(_radam_views, inline="always")
def _radam_views_impl(p_view, g_view, m_view, v_view, master_view, scalars):
    all_bfloat16 = all(isinstance(a, types.Array) and a.dtype == types.uint16
                       for a in (p_view, g_view, m_view, v_view))
    if not (all_bfloat16 and isinstance(master_view, types.NoneType) and sys.byteorder == "little"):
        return lambda p_view, g_view, m_view, v_view, master_view, scalars: _radam_elements(
            p_view, g_view, m_view, v_view, master_view, scalars)

    def by_pairs(p_view, g_view, m_view, v_view, master_view, scalars):
        # Pairs (2k, 2k+1) are 4-byte words when all four views start at one address mod 4:
        # peel one element if that is 2, pair the rest, finish an odd one alone.
        offset = p_view.ctypes.data & 3
        if (offset & 1 or g_view.ctypes.data & 3 != offset or m_view.ctypes.data & 3 != offset
                or v_view.ctypes.data & 3 != offset):  # rare: one loop for every case, to compile less
            _radam_element_loop(p_view, g_view, m_view, v_view, master_view, scalars)
            return
        n = p_view.size
        head = min(offset >> 1, n)
        end = head + (n - head) // 2 * 2
        if head:
            _radam_single(p_view, g_view, m_view, v_view, master_view, 0, scalars)
        _radam_bfloat16_words(p_view[head:end].view(np.uint32), g_view[head:end].view(np.uint32),
                              m_view[head:end].view(np.uint32), v_view[head:end].view(np.uint32), scalars)
        if end < n:
            _radam_single(p_view, g_view, m_view, v_view, master_view, n - 1, scalars)
    return by_pairs


@njit(inline="always")
def _row_scalars(floats, ints, row):
    """The element update's scalars tuple from table row ``row`` (the :data:`FLOAT_FIELDS` and
    :data:`INT_FIELDS` of :mod:`fastradam.scalars`)."""
    return (floats[row, 0], floats[row, 1], floats[row, 2], floats[row, 3], floats[row, 4],
            floats[row, 5], floats[row, 6], floats[row, 7], ints[row, 0] != 0, ints[row, 1])


@njit(inline="always")
def _radam_range(params, grads, exp_avg, exp_avg_sq, master, start, stop, floats, ints, row):
    """Elements ``start:stop`` with the scalars of table row ``row``, on views, so the index loops
    start at 0 and LLVM drops the negative-index checks that would block vectorisation."""
    _radam_views(params[start:stop], grads[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop],
                 _window(master, start, stop), _row_scalars(floats, ints, row))


@njit(parallel=True, cache=True, fastmath=False)
def _radam_blocks(params, grads, exp_avg, exp_avg_sq, master, block_start, block_stop, block_row, floats, ints):
    for b in prange(block_start.size):
        prefer_vector_width(VECTOR_BITS)
        row = block_row[b]
        if row >= 0:
            _radam_range(params, grads, exp_avg, exp_avg_sq, master, block_start[b], block_stop[b],
                         floats, ints, row)


@njit(parallel=True, cache=True)
def _non_finite_blocks(grads, block_start, block_stop, block_row):
    """How many gradient elements of the active blocks are NaN or infinite (a read-only pass)."""
    count = 0
    for b in prange(block_start.size):
        prefer_vector_width(VECTOR_BITS)
        found = 0
        if block_row[b] >= 0:
            view = grads[block_start[b]:block_stop[b]]
            for i in range(view.size):
                if not is_finite(view[i]):
                    found += 1
        count += found
    return count


@intrinsic
def _array_at(typingctx, address, size, like):
    """A pointer to ``like``'s dtype at integer ``address`` (for ``carray``)."""
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, size, like), codegen


def _tensor(addresses, t, column, n, like):
    """Tensor ``t``'s array of role ``column`` from the address table (None where ``like`` is None)."""


@overload(_tensor, inline="always")
def _tensor_impl(addresses, t, column, n, like):
    if isinstance(like, types.NoneType):
        return lambda addresses, t, column, n, like: None
    return lambda addresses, t, column, n, like: carray(_array_at(addresses[t, column], n, like), n)


@njit(parallel=True, cache=True, fastmath=False)
def _radam_tensor_blocks(addresses, sizes, block_start, block_stop, block_tensor, tensor_row, floats, ints,
                         p_like, g_like, m_like, master_like):
    for b in prange(block_start.size):
        prefer_vector_width(VECTOR_BITS)
        t = block_tensor[b]
        row = tensor_row[t]
        if row >= 0:
            n = sizes[t]
            _radam_range(_tensor(addresses, t, 0, n, p_like), _tensor(addresses, t, 1, n, g_like),
                         _tensor(addresses, t, 2, n, m_like), _tensor(addresses, t, 3, n, m_like),
                         _tensor(addresses, t, 4, n, master_like), block_start[b], block_stop[b],
                         floats, ints, row)


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


@functools.lru_cache(maxsize=64)
def _storage_name(dtype: np.dtype) -> str:
    name = dtype.name
    return name if dtype.isnative else f"{name} (non-native byte order)"


def storage_of(obj: np.ndarray) -> str:
    """The storage format of a NumPy array: its dtype's name (``bfloat16`` for ml_dtypes'), marked
    when the byte order is not the machine's (the kernels read native values only)."""
    return _storage_name(obj.dtype)


@functools.lru_cache(maxsize=64)
def _bit_view(dtype: np.dtype) -> np.dtype | None:
    view = BIT_VIEWS.get(dtype.name)
    return None if view is None else np.dtype(view)


def as_array(obj: np.ndarray) -> np.ndarray:
    """The array the kernels take, zero-copy: a plain ndarray (a subclass such as ``np.matrix``
    or ``np.memmap`` is viewed as one), as the bit view of a 16-bit float array."""
    plain = obj if type(obj) is np.ndarray else obj.view(np.ndarray)
    view = _bit_view(obj.dtype)
    return plain if view is None else plain.view(view)


def as_arrays(objects: Sequence[np.ndarray]) -> list[np.ndarray]:
    """:func:`as_array` of each object."""
    return [as_array(obj) for obj in objects]


def check_devices(arrays: list[np.ndarray]) -> None:
    """Host arrays all live in one memory space: nothing to check."""


def _flat(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else array.reshape(-1)


def _skipped(found_inf: bool, check_finite: bool, grads: np.ndarray, start: np.ndarray, stop: np.ndarray,
             rows: np.ndarray) -> bool:
    """A step is skipped when ``found_inf`` is set, or when asked to check and an active
    gradient element is NaN/inf (one read-only pass, before anything is written)."""
    return bool(found_inf) or (check_finite and _non_finite_blocks(grads, start, stop, rows) > 0)


def radam_step(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
               floats: np.ndarray, ints: np.ndarray, *, master: np.ndarray | None = None,
               found_inf: bool = False, check_finite: bool = False) -> None:
    """One RAdam step in place on validated buffers (any shape, flat in memory), with one-row tables."""
    start, stop, row = _flat_blocks(params.size)
    grads = _flat(grads)
    if not _skipped(found_inf, check_finite, grads, start, stop, row):
        _radam_blocks(_flat(params), grads, _flat(exp_avg), _flat(exp_avg_sq), _flat(master),
                      start, stop, row, floats, ints)


def radam_step_segments(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                        segments: SegmentArrays, segment_row: np.ndarray, floats: np.ndarray,
                        ints: np.ndarray, *, master: np.ndarray | None = None, found_inf: bool = False,
                        check_finite: bool = False) -> None:
    """One step over the segments of flat buffers; segment ``i`` uses row ``segment_row[i]`` (< 0: skipped)."""
    if "numba" not in segments.derived:
        segments.derived["numba"] = blocks(segments.offsets, segments.sizes)
    start, stop, segment = segments.derived["numba"]
    rows = segment_row[segment]
    if not _skipped(found_inf, check_finite, grads, start, stop, rows):
        _radam_blocks(params, grads, exp_avg, exp_avg_sq, master, start, stop, rows, floats, ints)


def radam_step_tensors(params: list[np.ndarray], grads: list[np.ndarray], exp_avg: list[np.ndarray],
                       exp_avg_sq: list[np.ndarray], tensor_row: np.ndarray, floats: np.ndarray,
                       ints: np.ndarray, *, master: list[np.ndarray] | None = None, found_inf: bool = False,
                       check_finite: bool = False) -> None:
    """One step over lists of separate tensors: one parallel loop over their address table."""
    if not params or found_inf:
        return
    if check_finite and any(tensor_row[i] >= 0 and _skipped(False, True, g.reshape(-1), *_flat_blocks(g.size))
                            for i, g in enumerate(grads)):
        return
    present = [x for x in (params, grads, exp_avg, exp_avg_sq, master) if x is not None]
    addresses = np.array([[a.__array_interface__["data"][0] for a in row] for row in zip(*present)],
                         dtype=np.int64)
    sizes = np.array([a.size for a in params], dtype=np.int64)
    start, stop, tensor = blocks(np.zeros_like(sizes), sizes)
    like = [np.empty(0, dtype=x[0].dtype) for x in (params, grads, exp_avg)]
    _radam_tensor_blocks(addresses, sizes, start, stop, tensor, tensor_row, floats, ints, *like,
                         None if master is None else np.empty(0, dtype=master[0].dtype))
