"""The Numba storage conversions against NumPy / ml_dtypes, bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from numba import njit, prange

from fastradam.backends.numba_storage import (
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
