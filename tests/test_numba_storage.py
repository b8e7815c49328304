"""The Numba storage conversions against NumPy / ml_dtypes, bit for bit."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from numba import njit, prange

from fastradam.backends.numba_storage import BFLOAT16_BITS, FLOAT16_BITS, is_finite, load, store

FORMATS = {"bfloat16": (np.dtype(ml_dtypes.bfloat16), BFLOAT16_BITS), "float16": (np.dtype(np.float16), FLOAT16_BITS)}


@njit(parallel=True)
def _convert(source, target):
    for i in prange(source.size):
        target[i] = store(load(source[i]), target)


@njit
def _finite(source, out):
    for i in range(source.size):
        out[i] = is_finite(source[i])


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
