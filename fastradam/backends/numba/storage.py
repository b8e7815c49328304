"""Storage conversions for the Numba kernels: 16-bit floats travel as their bit patterns.

Numba has no float16 or bfloat16 arithmetic on the CPU, so 16-bit buffers reach the kernels
as integer views, and the integer type says which format the bits hold:

- ``uint16``: bfloat16 bits (``ml_dtypes.bfloat16``),
- ``int16``: IEEE binary16 bits (``numpy.float16``),
- ``float32`` / ``float64``: themselves.

:func:`load` widens a stored value to float32 exactly (float64 stays float64); :func:`store`
rounds a math value to the storage format, round-to-nearest-even, keeping NaN and infinity
and producing subnormals where due, exactly as ``numpy``/``ml_dtypes`` ``astype`` does.
Dispatch is on the numba types, so every branch is decided at compile time.

When every buffer is bfloat16, the kernels can also take two neighbours at once as one 32-bit
word (:func:`bfloat16_pair` / :func:`bfloat16_word`): the same values and roundings, without
the 16-to-32-bit widening and narrowing shuffles that cost as much as the step's arithmetic.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from fastradam.backends.numba.target import native_half_conversions

BFLOAT16_BITS = np.uint16  #: the view dtype bfloat16 buffers travel as
FLOAT16_BITS = np.int16  #: the view dtype float16 buffers travel as


def _half_bits_to_float32(builder, bits):
    """LLVM IR: IEEE binary16 ``bits`` (i16) widened exactly to float32 in integer arithmetic, as
    F16C's ``vcvtph2ps`` and AArch64's ``fcvt`` do it (a signalling NaN comes back quiet, its payload kept)."""
    i32 = ir.IntType(32)
    word = builder.zext(bits, i32)
    sign = builder.shl(builder.and_(word, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
    exponent = builder.and_(builder.lshr(word, ir.Constant(i32, 10)), ir.Constant(i32, 0x1F))
    mantissa = builder.and_(word, ir.Constant(i32, 0x3FF))
    normal = builder.or_(builder.shl(builder.add(exponent, ir.Constant(i32, 127 - 15)), ir.Constant(i32, 23)),
                         builder.shl(mantissa, ir.Constant(i32, 13)))
    quiet = builder.select(builder.icmp_unsigned("!=", mantissa, ir.Constant(i32, 0)),
                           ir.Constant(i32, 0x400000), ir.Constant(i32, 0))
    special = builder.or_(builder.or_(ir.Constant(i32, 0x7F800000), builder.shl(mantissa, ir.Constant(i32, 13))), quiet)
    # zero and subnormals: mantissa * 2**-24, exact in float32
    tiny = builder.bitcast(builder.fmul(builder.uitofp(mantissa, ir.FloatType()), ir.Constant(ir.FloatType(), 2.0 ** -24)),
                           i32)
    magnitude = builder.select(builder.icmp_unsigned("==", exponent, ir.Constant(i32, 0)), tiny,
                               builder.select(builder.icmp_unsigned("==", exponent, ir.Constant(i32, 0x1F)), special,
                                              normal))
    return builder.bitcast(builder.or_(sign, magnitude), ir.FloatType())


def _float32_to_half_bits(builder, value):
    """LLVM IR: float32 ``value`` rounded to IEEE binary16 bits (i16) in integer arithmetic:
    nearest-even, overflow to infinity, subnormals where due, and a NaN quiet with the top of
    its payload, as F16C's ``vcvtps2ph`` and AArch64's ``fcvt`` do it. Subnormal results are
    rounded by one float32 addition (of 0.5, which lines the half's last mantissa bit up with
    float32's); normal ones by adding ``0xFFF`` plus the kept mantissa's lowest bit."""
    i32 = ir.IntType(32)
    word = builder.bitcast(value, i32)
    sign = builder.and_(builder.lshr(word, ir.Constant(i32, 16)), ir.Constant(i32, 0x8000))
    magnitude = builder.and_(word, ir.Constant(i32, 0x7FFFFFFF))
    nan = builder.or_(ir.Constant(i32, 0x7E00), builder.and_(builder.lshr(magnitude, ir.Constant(i32, 13)),
                                                             ir.Constant(i32, 0x3FF)))
    special = builder.select(builder.icmp_unsigned(">", magnitude, ir.Constant(i32, 0x7F800000)), nan,
                             ir.Constant(i32, 0x7C00))
    magic = 0x3F000000  # 0.5: 2**-14 subnormal steps of 2**-24 land on float32's last mantissa bit
    shifted = builder.fadd(builder.bitcast(magnitude, ir.FloatType()), ir.Constant(ir.FloatType(), 0.5))
    tiny = builder.sub(builder.bitcast(shifted, i32), ir.Constant(i32, magic))
    odd = builder.and_(builder.lshr(magnitude, ir.Constant(i32, 13)), ir.Constant(i32, 1))
    rounded = builder.add(builder.add(magnitude, ir.Constant(i32, ((15 - 127) << 23) + 0xFFF)), odd)
    normal = builder.lshr(rounded, ir.Constant(i32, 13))
    result = builder.select(builder.icmp_unsigned(">=", magnitude, ir.Constant(i32, (127 + 16) << 23)), special,
                            builder.select(builder.icmp_unsigned("<", magnitude, ir.Constant(i32, 113 << 23)), tiny,
                                           normal))
    return builder.trunc(builder.or_(result, sign), ir.IntType(16))


@intrinsic
def _half_to_float32(typingctx, bits):
    """IEEE binary16 bits (int16) widened exactly to float32: LLVM's ``fpext half`` where the CPU
    converts halves itself, integer arithmetic elsewhere (LLVM would call a runtime function
    that Numba does not link)."""
    def codegen(context, builder, signature, args):
        if native_half_conversions():
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return _half_bits_to_float32(builder, args[0])

    return types.float32(types.int16), codegen


@intrinsic
def _float32_to_half(typingctx, value):
    """float32 rounded to IEEE binary16 (nearest-even), as int16 bits: LLVM's ``fptrunc`` where
    the CPU converts halves itself, integer arithmetic elsewhere (the same bits)."""
    def codegen(context, builder, signature, args):
        if native_half_conversions():
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return _float32_to_half_bits(builder, args[0])

    return types.int16(types.float32), codegen


@intrinsic
def _bfloat16_to_float32(typingctx, bits):
    """bfloat16 bits (uint16) widened exactly to float32: the bits become the top half."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


def words_like(value, constant: int):
    """LLVM IR: a 32-bit integer constant shaped like ``value`` (a scalar, or a vector of as many lanes)."""
    i32 = ir.IntType(32)
    if isinstance(value.type, ir.VectorType):
        return ir.Constant(ir.VectorType(i32, value.type.count), [constant] * value.type.count)
    return ir.Constant(i32, constant)


def _round_to_bfloat16(builder, value):
    """LLVM IR: float32 ``value`` (or a vector of them) rounded to bfloat16, as i32 whose top half
    holds the result (the low half is garbage): nearest-even on the top 16 bits; a NaN becomes the
    canonical quiet NaN with its sign (``sign | 0x7FC0``, as ml_dtypes). Kept in 32-bit integer
    arithmetic (Numba would widen it to 64-bit lanes) so it vectorises 16 to a 512-bit register."""
    bits = builder.bitcast(value, words_like(value, 0).type)
    lowest_kept = builder.and_(builder.lshr(bits, words_like(value, 16)), words_like(value, 1))
    rounded = builder.add(builder.add(bits, words_like(value, 0x7FFF)), lowest_kept)
    quiet_nan = builder.or_(builder.and_(bits, words_like(value, 0x80000000)), words_like(value, 0x7FC00000))
    return builder.select(builder.fcmp_unordered("uno", value, value), quiet_nan, rounded)


def unpack_bfloat16_words(builder, words):
    """LLVM IR: the two bfloat16 values of 32-bit ``words`` (or a vector of them) widened exactly
    to float32, ``(low half, high half)``: the bits become the top half of a float32."""
    floats = ir.FloatType()
    if isinstance(words.type, ir.VectorType):
        floats = ir.VectorType(floats, words.type.count)
    low = builder.bitcast(builder.shl(words, words_like(words, 16)), floats)
    high = builder.bitcast(builder.and_(words, words_like(words, 0xFFFF0000)), floats)
    return low, high


def pack_bfloat16_words(builder, low, high):
    """LLVM IR: float32 ``low`` and ``high`` (or vectors of them) rounded to bfloat16 as
    :func:`_round_to_bfloat16` does and packed into 32-bit words, ``low`` in the low half."""
    low_bits = builder.lshr(_round_to_bfloat16(builder, low), words_like(low, 16))
    high_bits = builder.and_(_round_to_bfloat16(builder, high), words_like(high, 0xFFFF0000))
    return builder.or_(high_bits, low_bits)


@intrinsic
def _float32_to_bfloat16(typingctx, value):
    """float32 rounded to bfloat16 bits (uint16), as :func:`_round_to_bfloat16`."""
    def codegen(context, builder, signature, args):
        return builder.trunc(builder.lshr(_round_to_bfloat16(builder, args[0]), words_like(args[0], 16)),
                             ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def bfloat16_pair(typingctx, word):
    """The two bfloat16 values of a 32-bit word (little endian: element ``2k`` in the low half,
    ``2k+1`` in the high half), widened exactly to float32: ``(low, high)``."""
    def codegen(context, builder, signature, args):
        return context.make_tuple(builder, signature.return_type, unpack_bfloat16_words(builder, args[0]))

    return types.UniTuple(types.float32, 2)(types.uint32), codegen


@intrinsic
def bfloat16_word(typingctx, low, high):
    """Two float32 values rounded to bfloat16 (as :func:`_float32_to_bfloat16`) and packed into
    one 32-bit word, the inverse of :func:`bfloat16_pair`: no 16-bit lanes, so no narrowing."""
    def codegen(context, builder, signature, args):
        return pack_bfloat16_words(builder, args[0], args[1])

    return types.uint32(types.float32, types.float32), codegen


def load(value):
    """A stored value as its math type (float32 for 16-bit storage)."""


def store(value, array):
    """``value`` rounded to the storage format of ``array``'s elements."""


def is_finite(value):
    """Whether a stored value is finite (16-bit formats: exponent bits not all ones)."""


@overload(load, inline="always")
def _load(value):
    if value == types.uint16:
        return lambda value: _bfloat16_to_float32(value)
    if value == types.int16:
        return lambda value: _half_to_float32(value)
    if isinstance(value, types.Float):
        return lambda value: value
    return None


@overload(store, inline="always")
def _store(value, array):
    kind = array.dtype
    if kind == types.uint16:
        return lambda value, array: _float32_to_bfloat16(np.float32(value))
    if kind == types.int16:
        return lambda value, array: _float32_to_half(np.float32(value))
    if kind == types.float32:
        return lambda value, array: np.float32(value)
    if kind == types.float64:
        return lambda value, array: np.float64(value)
    return None


@overload(is_finite, inline="always")
def _is_finite(value):
    if value == types.uint16:
        return lambda value: (value & np.uint16(0x7F80)) != np.uint16(0x7F80)
    if value == types.int16:
        return lambda value: (np.uint16(value) & np.uint16(0x7C00)) != np.uint16(0x7C00)
    if isinstance(value, types.Float):
        return lambda value: np.isfinite(value)
    return None


# --- bfloat16 params that keep their fp32 values (fastradam.rounding states the rules) ---

def _quiet_nan_or(builder, value, bits, high):
    """LLVM IR: ``high`` (i32 holding bfloat16 bits), or the quiet NaN ``sign | 0x7FC0`` where ``value`` is a NaN."""
    i32 = ir.IntType(32)
    quiet_nan = builder.or_(builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 0x8000)),
                            ir.Constant(i32, 0x7FC0))
    return builder.select(builder.fcmp_unordered("uno", value, value), quiet_nan, high)


@intrinsic
def join_remainder(typingctx, bits, remainder):
    """The fp32 master of bfloat16 ``bits`` (uint16) and its int16 ``remainder``:
    ``((bits - (remainder < 0)) << 16) | uint16(remainder)``."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        low = builder.zext(args[1], i32)
        borrow = builder.zext(builder.icmp_signed("<", args[1], ir.Constant(ir.IntType(16), 0)), i32)
        high = builder.sub(builder.zext(args[0], i32), borrow)
        return builder.bitcast(builder.or_(builder.shl(high, ir.Constant(i32, 16)), low), ir.FloatType())

    return types.float32(types.uint16, types.int16), codegen


@intrinsic
def remainder_of(typingctx, value):
    """The int16 remainder of an fp32 master ``value``: its low 16 bits."""
    def codegen(context, builder, signature, args):
        return builder.trunc(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(16))

    return types.int16(types.float32), codegen


@intrinsic
def remainder_bfloat16(typingctx, value):
    """The bfloat16 bits (uint16) shown beside the remainder of an fp32 master ``value``: the high
    half, plus one when bit 15 is set (nearest, ties away from zero); a NaN as the quiet NaN."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        up = builder.and_(builder.lshr(bits, ir.Constant(i32, 15)), ir.Constant(i32, 1))
        high = builder.add(builder.lshr(bits, ir.Constant(i32, 16)), up)
        return builder.trunc(_quiet_nan_or(builder, args[0], bits, high), ir.IntType(16))

    return types.uint16(types.float32), codegen


def _lowbias32(builder, x):
    """LLVM IR: Wellons' lowbias32 hash of i32 ``x``."""
    i32 = ir.IntType(32)
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = builder.xor(x, builder.lshr(x, ir.Constant(i32, shift)))
        x = builder.mul(x, ir.Constant(i32, multiplier))
    return builder.xor(x, builder.lshr(x, ir.Constant(i32, 16)))


def _stochastic_half(builder, value, index, key_lo, key_hi):
    """LLVM IR: float32 ``value`` rounded stochastically (see :func:`stochastic_bfloat16`), as i32
    holding the bfloat16 bits in its low half."""
    i32, i64 = ir.IntType(32), ir.IntType(64)
    index = builder.sext(index, i64) if index.type.width < 64 else index
    low, high = builder.trunc(index, i32), builder.trunc(builder.lshr(index, ir.Constant(i64, 32)), i32)
    key_lo, key_hi = (builder.trunc(k, i32) if k.type.width > 32 else builder.sext(k, i32) if k.type.width < 32
                      else k for k in (key_lo, key_hi))
    mixed = _lowbias32(builder, builder.xor(builder.xor(_lowbias32(builder, builder.xor(low, key_lo)), high), key_hi))
    bits = builder.bitcast(value, i32)
    rounded = builder.lshr(builder.add(bits, builder.lshr(mixed, ir.Constant(i32, 16))), ir.Constant(i32, 16))
    return _quiet_nan_or(builder, value, bits, rounded)


def _integers(*kinds) -> bool:
    return all(isinstance(t, types.Integer) for t in kinds)


@intrinsic
def stochastic_bfloat16(typingctx, value, index, key_lo, key_hi):
    """float32 ``value`` rounded stochastically to bfloat16 bits (uint16): ``(bits + u) >> 16``
    with ``u`` the top 16 bits of ``lowbias32(lowbias32(uint32(index) ^ key_lo) ^ (index >> 32) ^ key_hi)``;
    a NaN as the quiet NaN. All in 32-bit integer lanes, so the loop vectorises."""
    def codegen(context, builder, signature, args):
        return builder.trunc(_stochastic_half(builder, *args), ir.IntType(16))

    if not _integers(index, key_lo, key_hi):
        return None
    return types.uint16(types.float32, index, key_lo, key_hi), codegen


@intrinsic
def stochastic_bfloat16_word(typingctx, low, high, index, key_lo, key_hi):
    """Two float32 values rounded stochastically (as :func:`stochastic_bfloat16`, elements ``index``
    and ``index + 1``) and packed into one 32-bit word, ``low`` in the low half."""
    def codegen(context, builder, signature, args):
        low, high, index, key_lo, key_hi = args
        first = _stochastic_half(builder, low, index, key_lo, key_hi)
        second = _stochastic_half(builder, high, builder.add(index, ir.Constant(index.type, 1)), key_lo, key_hi)
        return builder.or_(builder.and_(first, ir.Constant(ir.IntType(32), 0xFFFF)),
                           builder.shl(second, ir.Constant(ir.IntType(32), 16)))

    if not _integers(index, key_lo, key_hi):
        return None
    return types.uint32(types.float32, types.float32, index, key_lo, key_hi), codegen


# --- the same, two bfloat16 elements per 32-bit word (the all-bfloat16 loops) ---

def _remainder_half(builder, words, remainders, shift):
    """LLVM IR: the fp32 master of one half (``shift`` 0: the low half, 16: the high) of a bfloat16
    word and its remainder word."""
    i32 = ir.IntType(32)
    bits = builder.and_(builder.lshr(words, ir.Constant(i32, shift)), ir.Constant(i32, 0xFFFF))
    remainder = builder.and_(builder.lshr(remainders, ir.Constant(i32, shift)), ir.Constant(i32, 0xFFFF))
    borrow = builder.lshr(remainder, ir.Constant(i32, 15))
    return builder.bitcast(builder.or_(builder.shl(builder.sub(bits, borrow), ir.Constant(i32, 16)), remainder),
                           ir.FloatType())


@intrinsic
def remainder_pair(typingctx, words, remainders):
    """The two fp32 masters of a bfloat16 word and its remainder word (as :func:`join_remainder`): ``(low, high)``."""
    def codegen(context, builder, signature, args):
        halves = [_remainder_half(builder, args[0], args[1], shift) for shift in (0, 16)]
        return context.make_tuple(builder, signature.return_type, halves)

    return types.UniTuple(types.float32, 2)(types.uint32, types.uint32), codegen


@intrinsic
def remainder_words(typingctx, low, high):
    """Two fp32 masters as (bfloat16 word, remainder word), each half as :func:`remainder_bfloat16` and
    :func:`remainder_of`: the inverse of :func:`remainder_pair`."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        shown = []
        for value in args:
            bits = builder.bitcast(value, i32)
            up = builder.and_(builder.lshr(bits, ir.Constant(i32, 15)), ir.Constant(i32, 1))
            high_half = builder.add(builder.lshr(bits, ir.Constant(i32, 16)), up)
            shown.append(builder.and_(_quiet_nan_or(builder, value, bits, high_half), ir.Constant(i32, 0xFFFF)))
        low_bits, high_bits = (builder.bitcast(value, i32) for value in args)
        word = builder.or_(shown[0], builder.shl(shown[1], ir.Constant(i32, 16)))
        remainders = builder.or_(builder.and_(low_bits, ir.Constant(i32, 0xFFFF)),
                                 builder.shl(high_bits, ir.Constant(i32, 16)))
        return context.make_tuple(builder, signature.return_type, [word, remainders])

    return types.UniTuple(types.uint32, 2)(types.float32, types.float32), codegen
