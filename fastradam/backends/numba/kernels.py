"""The Numba backend's kernels: one parallel, vectorised, in-place pass over NumPy buffers.

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
(:mod:`fastradam.backends.numba.target`): the CPU's widest, also on Intel server cores whose
tuning alone would take 256 bits.

Storage: float32/float64 buffers are used as they are; bfloat16 and float16 buffers arrive as
``uint16``/``int16`` bit views (see :mod:`fastradam.backends.numba.storage`) and are widened
to float32 for the math and rounded back (nearest-even) on store. With fp32 master weights the
step reads and writes the master and writes the rounded 16-bit copy in the same pass. Numba
specialises the kernel on the buffers' types (and on ``master`` being None), so each storage
combination is its own vectorised loop. When all four buffers are bfloat16 the loop takes two
elements per 32-bit word (same arithmetic, same roundings, bit for bit): widening and narrowing
16-bit lanes costs about as much as the step's arithmetic, and that storage is the one where
the arithmetic, not the memory, can set the pace (8 % faster on cache-resident buffers). On
CPUs with AVX512-BF16 its words go 16 at a time through explicit vector code traced from
:func:`_radam_element` (:mod:`fastradam.backends.numba.bf16_lanes`: the hardware rounding where it
is exact, 1.40x faster again on cache-resident buffers); the last few words take the loop here.
"""

from __future__ import annotations

import sys

import numpy as np
import numba
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from fastradam.backends.numba import bf16_lanes
from fastradam.backends.numba.storage import (
    BFLOAT16_BITS,
    FLOAT16_BITS,
    bfloat16_pair,
    bfloat16_word,
    is_finite,
    join_remainder,
    load,
    remainder_bfloat16,
    remainder_of,
    remainder_pair,
    remainder_words,
    stochastic_bfloat16,
    stochastic_bfloat16_word,
    store,
)
from fastradam.backends.numba.target import prefer_vector_width
from fastradam.scalars import HOLD, RECTIFIED
from fastradam.spec import SCALAR_FLOATS, SCALAR_INDEX, SCALAR_INTS

#: Elements per block: 64K float32 is 256 KiB per buffer, enough work to amortise a block's
#: setup and small enough to balance two or more threads on a 1M-element buffer.
BLOCK = 1 << 16
#: Launches of at most this many elements run on the calling thread alone: one block of work, which
#: no second thread could share, so waking the pool (and waiting at its barrier for a thread the OS
#: has descheduled, milliseconds on a busy machine) buys nothing.
SERIAL_UP_TO = BLOCK
#: The vector width the kernels ask LLVM for (:func:`prefer_vector_width`): 512 bits where the
#: CPU has them, also where LLVM's tuning prefers 256 (Sapphire/Emerald Rapids; the in-cache
#: float32 step ran 1.2x faster with 512 on Emerald Rapids), the CPU's widest elsewhere, and
#: LLVM's 256 on the cores that downclock under 512-bit work (``target.DOWNCLOCKING_CORES``).
VECTOR_BITS = 512
#: The bit-view dtype each 16-bit storage format travels as.
BIT_VIEWS = {"bfloat16": BFLOAT16_BITS, "float16": FLOAT16_BITS}


# Positions of the scalars tuple's fields (fastradam.spec.SCALARS: the reals, then the ints).
_ONE_MINUS_BETA1, _BETA2, _ONE_MINUS_BETA2, _EPS, _EPS_ROOT, _L2_WEIGHT_DECAY, _PARAM_DECAY, _STEP_SIZE, \
    _INV_GRAD_SCALE, _NEGATE_GRAD, _MODE, _ROUND_KEY_LO, _ROUND_KEY_HI = (SCALAR_INDEX[name]
                                                                          for name in SCALAR_FLOATS + SCALAR_INTS)


@njit(inline="always")
def _radam_element(p, g, m, v, scalars):
    """One element of the RAdam update (see ``StepScalars``); returns the new ``(p, m, v)``.

    Also traced on vector lanes by :mod:`fastradam.backends.numba.bf16_lanes`: use only ``+ - * /``,
    unary minus, ``np.sqrt`` and branches on the flags or on ``scalar != 0``."""
    g = g * scalars[_INV_GRAD_SCALE]
    if scalars[_NEGATE_GRAD]:
        g = -g
    l2_weight_decay = scalars[_L2_WEIGHT_DECAY]
    if l2_weight_decay != 0:
        g = g + l2_weight_decay * p
    m = m + scalars[_ONE_MINUS_BETA1] * (g - m)
    v = scalars[_BETA2] * v + scalars[_ONE_MINUS_BETA2] * g * g
    mode = scalars[_MODE]
    if mode == RECTIFIED:
        eps_root = scalars[_EPS_ROOT]
        root = np.sqrt(v + eps_root) if eps_root != 0 else np.sqrt(v)
        p = p * scalars[_PARAM_DECAY] - scalars[_STEP_SIZE] * m / (root + scalars[_EPS])
    elif mode != HOLD:
        p = p * scalars[_PARAM_DECAY] - scalars[_STEP_SIZE] * m
    return p, m, v


# How the params keep their values travels in the "keeper" slot, and its type picks the code at
# compile time: None (the params themselves, rounded to nearest-even), a float32 array (the fp32
# master), an int16 array (remainders beside bfloat16 params), or an integer: the global element
# index of the slot's first element, for stochastic rounding (fastradam.rounding).

def _window(keeper, start, stop):
    """``keeper[start:stop]`` for a master or remainders; None and a stochastic index as they are
    (the index already names element ``start``)."""


@overload(_window, inline="always")
def _window_impl(keeper, start, stop):
    if isinstance(keeper, (types.NoneType, types.Integer)):
        return lambda keeper, start, stop: keeper
    return lambda keeper, start, stop: keeper[start:stop]


def _load_param(params, keeper, i):
    """The parameter in math type: from the fp32 master, or joined with its remainder, when there is one."""


@overload(_load_param, inline="always")
def _load_param_impl(params, keeper, i):
    if isinstance(keeper, (types.NoneType, types.Integer)):
        return lambda params, keeper, i: load(params[i])
    if keeper.dtype == types.int16:
        return lambda params, keeper, i: join_remainder(params[i], keeper[i])
    return lambda params, keeper, i: keeper[i]


def _store_param(params, keeper, i, value, scalars):
    """Store the new parameter: into the master (fp32) and its rounded copy, split into bfloat16
    and remainder, rounded stochastically, or rounded to nearest-even into params."""


@overload(_store_param, inline="always")
def _store_param_impl(params, keeper, i, value, scalars):
    if isinstance(keeper, types.NoneType):
        def store_params(params, keeper, i, value, scalars):
            params[i] = store(value, params)
        return store_params
    if isinstance(keeper, types.Integer):
        def store_stochastic(params, keeper, i, value, scalars):
            params[i] = stochastic_bfloat16(np.float32(value), keeper + i, scalars[_ROUND_KEY_LO],
                                            scalars[_ROUND_KEY_HI])
        return store_stochastic
    if keeper.dtype == types.int16:
        def store_split(params, keeper, i, value, scalars):
            master = np.float32(value)
            params[i] = remainder_bfloat16(master)
            keeper[i] = remainder_of(master)
        return store_split

    def store_both(params, keeper, i, value, scalars):
        keeper[i] = np.float32(value)
        params[i] = store(value, params)
    return store_both


@njit(inline="always")
def _radam_at(p_view, g_view, m_view, v_view, master_view, i, scalars):
    """Element ``i`` of the views, loaded, updated and stored back in its own storage."""
    p, m, v = _radam_element(_load_param(p_view, master_view, i), load(g_view[i]), load(m_view[i]),
                             load(v_view[i]), scalars)
    _store_param(p_view, master_view, i, p, scalars)
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
    away (``g * 1``, ``-g``, ``l2 * p``, ``v + eps_root``, the update-mode branches): the same results, fewer
    instructions per element. Valid where :func:`_is_plain`."""


@overload(_plain, inline="always")
def _plain_impl(scalars):
    real = scalars[0]

    def plain(scalars):
        return (scalars[_ONE_MINUS_BETA1], scalars[_BETA2], scalars[_ONE_MINUS_BETA2], scalars[_EPS], real(0.0),
                real(0.0), scalars[_PARAM_DECAY], scalars[_STEP_SIZE], real(1.0), False, RECTIFIED,
                scalars[_ROUND_KEY_LO], scalars[_ROUND_KEY_HI])
    return plain


@njit(inline="always")
def _is_plain(scalars):
    """Whether the step is rectified, unscaled, not negated, without L2 decay or eps_root (the common case)."""
    return (scalars[_MODE] == RECTIFIED and not scalars[_NEGATE_GRAD] and scalars[_L2_WEIGHT_DECAY] == 0
            and scalars[_INV_GRAD_SCALE] == 1 and scalars[_EPS_ROOT] == 0)


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
    """The explicit AVX-512 loop of :mod:`fastradam.backends.numba.bf16_lanes` over the leading words,
    :func:`_radam_element` traced into it; returns how many words it stepped."""
    def codegen(context, builder, signature, args):
        return bf16_lanes.emit_word_vectors(context, builder, signature, args, _radam_element.py_func)

    return types.intp(p_words, g_words, m_words, v_words, scalars), codegen


def _leading_word_vectors(p_words, g_words, m_words, v_words, scalars):
    """Step the leading words 16 at a time where the CPU can (see ``bf16_lanes``; not with an
    eps_root); return how many."""


@overload(_leading_word_vectors, inline="always")
def _leading_word_vectors_impl(p_words, g_words, m_words, v_words, scalars):
    if bf16_lanes.available() and all(a.layout == "C" for a in (p_words, g_words, m_words, v_words)):
        def vectors(p_words, g_words, m_words, v_words, scalars):
            if scalars[_EPS_ROOT] != 0:  # the traced variants leave eps_root out
                return 0
            return _radam_word_vectors(p_words, g_words, m_words, v_words, scalars)
        return vectors
    return lambda p_words, g_words, m_words, v_words, scalars: 0


def _keeper_words(keeper, start, stop):
    """The keeper of words ``start // 2 ...`` of an all-bfloat16 step: None; for stochastic
    rounding the global index of element ``start``; remainders as 32-bit words (two per word)."""


@overload(_keeper_words, inline="always")
def _keeper_words_impl(keeper, start, stop):
    if isinstance(keeper, types.NoneType):
        return lambda keeper, start, stop: None
    if isinstance(keeper, types.Integer):
        return lambda keeper, start, stop: keeper + start
    return lambda keeper, start, stop: keeper[start:stop].view(np.uint32)


def _words_from(keeper_words, done):
    """``keeper_words`` from word ``done`` on."""


@overload(_words_from, inline="always")
def _words_from_impl(keeper_words, done):
    if isinstance(keeper_words, types.NoneType):
        return lambda keeper_words, done: None
    if isinstance(keeper_words, types.Integer):
        return lambda keeper_words, done: keeper_words + 2 * done
    return lambda keeper_words, done: keeper_words[done:]


def _load_word(p_words, keeper_words, k):
    """The two parameters of word ``k`` in math type: joined with their remainders where there are some."""


@overload(_load_word, inline="always")
def _load_word_impl(p_words, keeper_words, k):
    if isinstance(keeper_words, types.Array):
        return lambda p_words, keeper_words, k: remainder_pair(p_words[k], keeper_words[k])
    return lambda p_words, keeper_words, k: bfloat16_pair(p_words[k])


def _store_word(p_words, keeper_words, k, p0, p1, scalars):
    """Store word ``k``'s two new parameters: rounded to nearest-even, stochastically, or split with their remainders."""


@overload(_store_word, inline="always")
def _store_word_impl(p_words, keeper_words, k, p0, p1, scalars):
    if isinstance(keeper_words, types.NoneType):
        def nearest(p_words, keeper_words, k, p0, p1, scalars):
            p_words[k] = bfloat16_word(p0, p1)
        return nearest
    if isinstance(keeper_words, types.Integer):
        def stochastic(p_words, keeper_words, k, p0, p1, scalars):
            p_words[k] = stochastic_bfloat16_word(p0, p1, keeper_words + 2 * k, scalars[_ROUND_KEY_LO],
                                                  scalars[_ROUND_KEY_HI])
        return stochastic

    def split(p_words, keeper_words, k, p0, p1, scalars):
        p_words[k], keeper_words[k] = remainder_words(p0, p1)
    return split


def _leading_keeper_vectors(p_words, g_words, m_words, v_words, keeper_words, scalars):
    """:func:`_leading_word_vectors` where the params keep nothing else (the explicit vector code
    rounds to nearest-even only); 0 words otherwise."""


@overload(_leading_keeper_vectors, inline="always")
def _leading_keeper_vectors_impl(p_words, g_words, m_words, v_words, keeper_words, scalars):
    if isinstance(keeper_words, types.NoneType):
        return lambda p_words, g_words, m_words, v_words, keeper_words, scalars: _leading_word_vectors(
            p_words, g_words, m_words, v_words, scalars)
    return lambda p_words, g_words, m_words, v_words, keeper_words, scalars: 0


@njit(inline="always")
def _radam_bfloat16_words(p_words, g_words, m_words, v_words, keeper_words, scalars):
    """bfloat16 buffers two elements at a time, as 32-bit words: the same element updates, the
    leading words 16 at a time in explicit vector code where the CPU has it (rounding to nearest)."""
    done = _leading_keeper_vectors(p_words, g_words, m_words, v_words, keeper_words, scalars)
    _radam_word_pairs(p_words[done:], g_words[done:], m_words[done:], v_words[done:],
                      _words_from(keeper_words, done), scalars)


@njit(inline="always")
def _radam_word_pairs(p_words, g_words, m_words, v_words, keeper_words, scalars):
    """The words one at a time, each as its two elements (the loop LLVM vectorises), the
    common case (:func:`_plain`) in a loop of its own."""
    if _is_plain(scalars):
        _radam_word_pair_loop(p_words, g_words, m_words, v_words, keeper_words, _plain(scalars))
    else:
        _radam_word_pair_loop(p_words, g_words, m_words, v_words, keeper_words, scalars)


@njit(inline="always")
def _radam_word_pair_loop(p_words, g_words, m_words, v_words, keeper_words, scalars):
    for k in range(p_words.size):
        p0, p1 = _load_word(p_words, keeper_words, k)
        g0, g1 = bfloat16_pair(g_words[k])
        m0, m1 = bfloat16_pair(m_words[k])
        v0, v1 = bfloat16_pair(v_words[k])
        p0, m0, v0 = _radam_element(p0, g0, m0, v0, scalars)
        p1, m1, v1 = _radam_element(p1, g1, m1, v1, scalars)
        _store_word(p_words, keeper_words, k, p0, p1, scalars)
        m_words[k] = bfloat16_word(m0, m1)
        v_words[k] = bfloat16_word(v0, v1)


def _keeper_offset(keeper, offset):
    """The address of a remainder view mod 4; ``offset`` (agreeing) for no keeper or an index."""


@overload(_keeper_offset, inline="always")
def _keeper_offset_impl(keeper, offset):
    if isinstance(keeper, types.Array):
        return lambda keeper, offset: keeper.ctypes.data & 3
    return lambda keeper, offset: offset


def _radam_views(p_view, g_view, m_view, v_view, master_view, scalars):
    """Update the views in place: element by element, or by bfloat16 pairs where they can be."""


@overload(_radam_views, inline="always")
def _radam_views_impl(p_view, g_view, m_view, v_view, master_view, scalars):
    all_bfloat16 = all(isinstance(a, types.Array) and a.dtype == types.uint16
                       for a in (p_view, g_view, m_view, v_view))
    pairable_keeper = isinstance(master_view, (types.NoneType, types.Integer)) or (
        isinstance(master_view, types.Array) and master_view.dtype == types.int16)
    if not (all_bfloat16 and pairable_keeper and sys.byteorder == "little"):
        return lambda p_view, g_view, m_view, v_view, master_view, scalars: _radam_elements(
            p_view, g_view, m_view, v_view, master_view, scalars)

    def by_pairs(p_view, g_view, m_view, v_view, master_view, scalars):
        # Pairs (2k, 2k+1) are 4-byte words when all views start at one address mod 4:
        # peel one element if that is 2, pair the rest, finish an odd one alone.
        offset = p_view.ctypes.data & 3
        if (offset & 1 or g_view.ctypes.data & 3 != offset or m_view.ctypes.data & 3 != offset
                or v_view.ctypes.data & 3 != offset
                or _keeper_offset(master_view, offset) != offset):  # rare: one loop for every case, to compile less
            _radam_element_loop(p_view, g_view, m_view, v_view, master_view, scalars)
            return
        n = p_view.size
        head = min(offset >> 1, n)
        end = head + (n - head) // 2 * 2
        if head:
            _radam_single(p_view, g_view, m_view, v_view, master_view, 0, scalars)
        _radam_bfloat16_words(p_view[head:end].view(np.uint32), g_view[head:end].view(np.uint32),
                              m_view[head:end].view(np.uint32), v_view[head:end].view(np.uint32),
                              _keeper_words(master_view, head, end), scalars)
        if end < n:
            _radam_single(p_view, g_view, m_view, v_view, master_view, n - 1, scalars)
    return by_pairs


def _generated_row_scalars():
    """``_row_scalars(floats, ints, row)``: the element update's scalars tuple from table row ``row``,
    its fields generated from :data:`fastradam.spec.SCALARS` (the reals, then the ints)."""
    fields = [f"floats[row, {k}]" for k in range(len(SCALAR_FLOATS))] + [f"ints[row, {k}]"
                                                                         for k in range(len(SCALAR_INTS))]
    namespace: dict = {}
    exec(f"def _row_scalars(floats, ints, row):\n    return ({', '.join(fields)},)", namespace)
    return njit(inline="always")(namespace["_row_scalars"])


_row_scalars = _generated_row_scalars()


@njit(inline="always")
def _radam_range(params, grads, exp_avg, exp_avg_sq, master, start, stop, floats, ints, row):
    """Elements ``start:stop`` with the scalars of table row ``row``, on views, so the index loops
    start at 0 and LLVM drops the negative-index checks that would block vectorisation."""
    _radam_views(params[start:stop], grads[start:stop], exp_avg[start:stop], exp_avg_sq[start:stop],
                 _window(master, start, stop), _row_scalars(floats, ints, row))


def _launch_threading_layer() -> None:
    """Start Numba's threading layer, which defines the symbols the kernels call below, without
    changing torch's thread count: the OpenMP layer's launch sets the process's OpenMP thread count,
    which torch reads, so a ``torch.set_num_threads(1)`` made before would be lost (and torch's
    ops slowed many times over where another process shares the cores)."""
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    numba.get_num_threads()
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_launch_threading_layer()


@intrinsic
def get_num_threads(typingctx):
    """``numba.get_num_threads()`` by the threading layer's symbol, not Numba's ctypes global
    (which would keep the kernels out of the disk cache)."""
    def codegen(context, builder, signature, args):  # declared as Numba's parallel loops declare it
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(cgutils.intp_t, []),
                                                  "get_num_threads")
        return builder.call(function, [])
    return types.intp(), codegen


@intrinsic
def set_num_threads(typingctx, count):
    """``numba.set_num_threads(count)`` for this thread's next parallel loops, by the threading
    layer's symbol (as :func:`get_num_threads`)."""
    def codegen(context, builder, signature, args):  # the C function takes an int
        function = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(32)]),
                                                  "set_num_threads")
        builder.call(function, [builder.trunc(args[0], ir.IntType(32))])
        return context.get_dummy_value()
    if not isinstance(count, types.Integer) or count.bitwidth < 32:
        return None
    return types.void(count), codegen


@njit(inline="always")
def _threads(serial):
    """The thread count so far, and from here on one thread alone when ``serial``
    (:data:`SERIAL_UP_TO`); the caller restores the count after its loop."""
    threads = get_num_threads()
    if serial:
        set_num_threads(1)
    return threads


def _block_keeper(keeper, block_index, b):
    """Block ``b``'s keeper: the master or remainders as they are, or, for stochastic rounding
    (``block_index`` not None), the global index of the block's first element."""


@overload(_block_keeper, inline="always")
def _block_keeper_impl(keeper, block_index, b):
    if isinstance(block_index, types.NoneType):
        return lambda keeper, block_index, b: keeper
    return lambda keeper, block_index, b: block_index[b]


@njit(parallel=True, cache=True, fastmath=False)
def _radam_blocks(params, grads, exp_avg, exp_avg_sq, master, block_start, block_stop, block_row, block_index,
                  floats, ints, serial):
    threads = _threads(serial)
    for b in prange(block_start.size):
        prefer_vector_width(VECTOR_BITS)
        row = block_row[b]
        if row >= 0:
            _radam_range(params, grads, exp_avg, exp_avg_sq, _block_keeper(master, block_index, b), block_start[b],
                         block_stop[b], floats, ints, row)
    set_num_threads(threads)


@njit(inline="always")
def _non_finite_count(view):
    """How many elements of ``view`` are NaN or infinite."""
    found = 0
    for i in range(view.size):
        if not is_finite(view[i]):
            found += 1
    return found


@njit(parallel=True, cache=True)
def _non_finite_blocks(grads, block_start, block_stop, block_row, serial):
    """How many gradient elements of the active blocks are NaN or infinite (a read-only pass)."""
    threads = _threads(serial)
    count = 0
    for b in prange(block_start.size):
        prefer_vector_width(VECTOR_BITS)
        if block_row[b] >= 0:
            count += _non_finite_count(grads[block_start[b]:block_stop[b]])
    set_num_threads(threads)
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


def _tensor_keeper(addresses, t, n, keeper_like, block_index, b):
    """Tensor ``t``'s keeper in block ``b``: its master or remainders, or, for stochastic rounding,
    the global index of the block's first element."""


@overload(_tensor_keeper, inline="always")
def _tensor_keeper_impl(addresses, t, n, keeper_like, block_index, b):
    if isinstance(block_index, types.NoneType):
        return lambda addresses, t, n, keeper_like, block_index, b: _tensor(addresses, t, 4, n, keeper_like)
    return lambda addresses, t, n, keeper_like, block_index, b: block_index[b]


@njit(parallel=True, cache=True)
def _non_finite_tensor_blocks(addresses, block_start, block_stop, block_tensor, tensor_row, g_like, serial):
    """How many gradient elements of the active tensors' blocks are NaN or infinite (read only)."""
    threads = _threads(serial)
    count = 0
    for b in prange(block_start.size):
        prefer_vector_width(VECTOR_BITS)
        t = block_tensor[b]
        if tensor_row[t] >= 0:
            count += _non_finite_count(carray(_array_at(addresses[t, 1], block_stop[b], g_like),
                                              block_stop[b])[block_start[b]:])
    set_num_threads(threads)
    return count


@njit(parallel=True, cache=True, fastmath=False)
def _radam_tensor_blocks(addresses, sizes, block_start, block_stop, block_tensor, tensor_row, block_index, floats,
                         ints, p_like, g_like, m_like, master_like, serial):
    threads = _threads(serial)
    for b in prange(block_start.size):
        prefer_vector_width(VECTOR_BITS)
        t = block_tensor[b]
        row = tensor_row[t]
        if row >= 0:
            n = sizes[t]
            _radam_range(_tensor(addresses, t, 0, n, p_like), _tensor(addresses, t, 1, n, g_like),
                         _tensor(addresses, t, 2, n, m_like), _tensor(addresses, t, 3, n, m_like),
                         _tensor_keeper(addresses, t, n, master_like, block_index, b),
                         block_start[b], block_stop[b], floats, ints, row)
    set_num_threads(threads)
