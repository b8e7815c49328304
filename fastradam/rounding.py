"""How bfloat16 parameters keep their fp32 values: remainders, and stochastic rounding's key.

**Remainders** (Transformer Engine's ``store_param_remainders`` format, bit for bit). An fp32
master value with bits ``X`` is kept as a bfloat16 parameter ``b`` and an int16 remainder ``r``::

    r = int16(X & 0xFFFF)                 # the low half, as it is
    b = (X >> 16) + (1 if r < 0 else 0)   # the high half, rounded up in magnitude when bit 15 is set
    X = ((b - (1 if r < 0 else 0)) << 16) | uint16(r)      # the decode: exact for every X

so ``b`` is ``X`` rounded to nearest with ties away from zero. Round-to-nearest-even (what the
fp32-master path writes) differs only at a tie (``X & 0xFFFF == 0x8000``) whose high half is
even, by one bfloat16 ulp: one element in 2**17 of uniformly spread low bits. No 16-bit encoding
can do better: nearest-even maps 65537 fp32 patterns onto each even bfloat16 (both ties) and
65535 onto each odd one, so any exact 16-bit encoding moves at least one pattern per even
bfloat16 off nearest-even, exactly what this one does; and this one reads Transformer Engine's
checkpoints. The master (and so the whole trajectory) is bit-identical to the fp32-master path.
One departure from Transformer Engine, for NaN only: a NaN master shows as the quiet NaN
``sign | 0x7FC0`` in ``b``, as the nearest-even path writes it (the bit rule above would show
``0x7F800001`` as infinity and ``0xFFFF8000`` as +0), and decodes to a NaN again (payload not kept).

**Stochastic rounding** of an fp32 result ``y`` (bits ``Y``) to bfloat16, without a master::

    b = (Y + u) >> 16          u: 16 random bits; a NaN becomes the quiet NaN sign | 0x7FC0

rounds the magnitude up with probability ``(Y & 0xFFFF) / 2**16`` (unbiased; torchao's
``_fp32_to_bf16_sr`` draws the same distribution), overflowing to infinity as the bits say. The
bits are a counter-based hash of the step's key and the element's global index ``i`` (its place
in the concatenation of all the step's tensors in order, active or not; padding between layout
segments is not counted), so every backend, thread count, block size and layout of the same tensors gives the
same bits::

    key = splitmix64(seed ^ splitmix64(step))                     # on the host, per step (and row)
    h = lowbias32(lowbias32(uint32(i) ^ key_lo) ^ uint32(i >> 32) ^ key_hi)
    u = h >> 16

with ``lowbias32`` Wellons' 32-bit integer hash (two xor-shift-multiply rounds) and ``splitmix64``
Steele, Lea and Flood's finaliser, all arithmetic modulo 2**32 / 2**64.
"""

from __future__ import annotations

import numbers

_MASK64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """SplitMix64's output function of ``z`` (mod 2**64)."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def check_seed(seed: object, name: str = "stochastic_round_seed") -> int:
    """``seed`` as an int in ``[0, 2**64)``; TypeError unless it is an integer (booleans refused)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= int(seed) <= _MASK64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {seed}")
    return int(seed)


def _int32_bits(word: int) -> int:
    """A 32-bit word as the int32 with its bits (the kernels' int columns)."""
    return word - (1 << 32) if word >= 1 << 31 else word


def round_key(seed: int, step: int) -> tuple[int, int]:
    """The stochastic-rounding key of step ``step``: its low and high 32 bits, each as the int32
    with those bits (the scalar table's ``round_key_lo`` / ``round_key_hi`` columns)."""
    key = splitmix64(seed ^ splitmix64(step))
    return _int32_bits(key & 0xFFFFFFFF), _int32_bits(key >> 32)
