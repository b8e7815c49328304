"""The Numba storage conversions against NumPy / ml_dtypes, bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from fastradam.backends.numba import storage as numba_storage, target as numba_target
from fastradam.backends.numba.storage import (
    BFLOAT16_BITS,
    FLOAT16_BITS,
    bfloat16_pair,
    bfloat16_word,
    is_finite,
    load,
    store,
)

FORMATS = {"bfloat16": (np.dtype(ml_dtypes.bfloat16), BFLOAT16_BITS), "float16": (np.dtype(np.float16), FLOAT16_BITS)}


@njit(parallel=True)
def _convert(source, target):
    for i in prange(source.size):
        target[i] = store(load(source[i]), target)


@njit
def _finite(source, out):
    for i in range(source.size):
        out[i] = is_finite(source[i])


@njit(parallel=True)
def _words_to_floats(words, low, high):
    for k in prange(words.size):
        low[k], high[k] = bfloat16_pair(words[k])


@njit(parallel=True)
def _floats_to_words(low, high, words):
    for k in prange(words.size):
        words[k] = bfloat16_word(low[k], high[k])


@pytest.mark.parametrize("name", FORMATS)
def test_widening_is_exact_for_every_16_bit_pattern(name):
    dtype, bits = FORMATS[name]
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(bits)
    widened = np.empty(patterns.size, np.float32)
    _convert(patterns, widened)
    want = patterns.view(dtype).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(widened[~nan], want[~nan]) and np.isnan(widened[nan]).all()
    finite = np.empty(patterns.size, np.bool_)
    _finite(patterns, finite)
    assert np.array_equal(finite, np.isfinite(want))


@pytest.mark.parametrize("name", FORMATS)
def test_narrowing_rounds_to_nearest_even_like_astype(name):
    dtype, bits = FORMATS[name]
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2**32, 2**21, dtype=np.uint64).astype(np.uint32).view(np.float32)
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65504, 65519.99, 65520, 1e-8, 2.98e-8, 6e-8,
                1e-40, -1e-45, 3.4e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-11]
    values = np.concatenate([values, np.array(specials, np.float32)])
    narrowed = np.empty(values.size, bits)
    _convert(values, narrowed)
    with np.errstate(all="ignore"):
        want = values.astype(dtype).view(bits)
    nan = np.isnan(values)
    assert np.array_equal(narrowed[~nan], want[~nan])
    assert np.isnan(narrowed[nan].view(dtype).astype(np.float32)).all()
    assert np.array_equal(np.signbit(narrowed[nan].view(dtype).astype(np.float32)), np.signbit(values[nan]))
    if name == "bfloat16":  # ml_dtypes makes every NaN the canonical quiet one, sign kept
        assert np.array_equal(narrowed[nan], want[nan])


def test_float_storage_passes_through():
    values = np.array([1.5, -np.inf, 1e-45], np.float32)
    out = np.empty(3, np.float32)
    _convert(values, out)
    assert out.tobytes() == values.tobytes()


def _random_floats_and_specials(count):
    """Random float32 bit patterns (every class: NaNs, infinities, subnormals) and edge values."""
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.4e38, 1e-40, -1e-45,
                         1.0 + 2**-8, 1.0 + 3 * 2**-8], np.float32)
    return np.concatenate([values, specials, specials[::-1]])


def test_bfloat16_words_unpack_both_halves_exactly():
    """Little endian: element 2k is the low half of word k, element 2k+1 the high half."""
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    words = patterns.view(np.uint32)
    low, high = np.empty(words.size, np.float32), np.empty(words.size, np.float32)
    _words_to_floats(words, low, high)
    for got, want in ((low, patterns[0::2]), (high, patterns[1::2])):
        assert got.view(np.uint32).tobytes() == (want.astype(np.uint32) << 16).tobytes()


def test_bfloat16_words_round_like_astype_and_the_one_at_a_time_store():
    values = _random_floats_and_specials(2**21)
    words = np.empty(values.size // 2, np.uint32)
    _floats_to_words(values[0::2], values[1::2], words)
    one_at_a_time = np.empty(values.size, BFLOAT16_BITS)
    _convert(values, one_at_a_time)
    assert words.view(np.uint16).tobytes() == one_at_a_time[:2 * words.size].tobytes()
    with np.errstate(all="ignore"):
        assert words.view(np.uint16).tobytes() == values[:2 * words.size].astype(ml_dtypes.bfloat16).tobytes()


@intrinsic
def _both_half_widenings(typingctx, bits):
    """(LLVM's fpext half, the integer widening) of one int16 half, as uint32 float bits."""
    def codegen(context, builder, signature, args):
        native = builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        integer = numba_storage._half_bits_to_float32(builder, args[0])
        return context.make_tuple(builder, signature.return_type,
                                  [builder.bitcast(v, ir.IntType(32)) for v in (native, integer)])

    return types.UniTuple(types.uint32, 2)(types.int16), codegen


@intrinsic
def _both_half_roundings(typingctx, value):
    """(LLVM's fptrunc to half, the integer rounding) of one float32, as int16 bits."""
    def codegen(context, builder, signature, args):
        native = builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return context.make_tuple(builder, signature.return_type,
                                  [native, numba_storage._float32_to_half_bits(builder, args[0])])

    return types.UniTuple(types.int16, 2)(types.float32), codegen


@njit(parallel=True)
def _half_conversions_both_ways(halves, floats, widened, rounded):
    for i in prange(halves.size):
        widened[0, i], widened[1, i] = _both_half_widenings(halves[i])
    for i in prange(floats.size):
        rounded[0, i], rounded[1, i] = _both_half_roundings(floats[i])


@pytest.mark.skipif(not numba_target.native_half_conversions(),
                    reason="this CPU has no half conversions of its own to compare with")
def test_integer_half_conversions_equal_the_cpus_own_bit_for_bit():
    """CPUs without F16C (the x86-64 baseline, ``NUMBA_CPU_NAME=generic``) convert halves in
    integer arithmetic: it must give the hardware's bits, NaN payloads and quieting included, for
    every half, for float32 patterns of every class around each rounding boundary, and for every
    positive float32 that rounds to a finite non-zero half."""
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    boundaries = [np.arange(start - 4096, start + 4096, dtype=np.uint32)
                  for start in (0x33000000, 0x387FC000, 0x38800000, 0x477FE000, 0x477FF000, 0x47800000, 0x7F800000)]
    floats = np.concatenate([_random_floats_and_specials(2**21).view(np.uint32), *boundaries])
    floats = np.concatenate([floats, floats ^ np.uint32(0x80000000)]).view(np.float32)
    widened, rounded = np.empty((2, halves.size), np.uint32), np.empty((2, floats.size), np.int16)
    _half_conversions_both_ways(halves, floats, widened, rounded)
    assert np.array_equal(widened[0], widened[1]), np.flatnonzero(widened[0] != widened[1])[:8]
    assert np.array_equal(rounded[0], rounded[1]), floats[rounded[0] != rounded[1]][:8]
    # every float32 whose half is neither zero nor infinity: [2**-25, 65520), each a tie or not
    chunk = 1 << 24
    rounded = np.empty((2, chunk), np.int16)
    for start in range(0x33000000, 0x47800000, chunk):
        floats = np.arange(start, min(start + chunk, 0x47800000), dtype=np.uint32).view(np.float32)
        _half_conversions_both_ways(halves[:0], floats, widened[:, :0], rounded[:, :floats.size])
        assert np.array_equal(rounded[0, :floats.size], rounded[1, :floats.size]), hex(start)
