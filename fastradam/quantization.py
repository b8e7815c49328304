"""Blockwise 8-bit and 4-bit optimizer moments (issue 16): the declared formats, their code maps,
the block layout, and the rule by which float32 kernels choose a code.

The oracle (:func:`fastradam.reference.quantize_blockwise` and friends) takes only the maps from
here and chooses codes its own way; kernels are tested against it with :func:`near_midpoint`.

Formats
=======
======  =====  ==============================  ==============================  =======  ===========
name    block  exp_avg (m) map                 exp_avg_sq (v) map              codes/B  state B/elem
======  =====  ==============================  ==============================  =======  ===========
8bit    256    bnb dynamic, signed (256)       bnb dynamic, unsigned (256)     1        2 + 8/256 = 2.03125
4bit    128    torchao dynamic(True, 3, 4)     torchao linear 1/16 ... 1 (16)  2        1 + 8/128 = 1.0625
======  =====  ==============================  ==============================  =======  ===========

Each block of ``block`` consecutive elements of one moment stores one code per element and one
float32 scale (the block's absmax): the value is ``map[code] * scale``. Neither moment is
transformed first (v is quantised directly, not sqrt(v)), as in bitsandbytes and torchao. A step
with float32 params and grads moves 4+4 (p) + 4 (g) + 2 * 2.03125 = 16.0625 B/element at 8 bits;
bfloat16 params and grads 10.0625 (8 bits) and 8.125 (4 bits) (:meth:`BlockFormat.step_bytes_per_element`).

The maps
========
Generated here, not pasted: each generator below re-derives its peer's definition in float64,
and the kernels hold the result rounded to float32 (:attr:`CodeMap.values`), sorted ascending, so a
code is an index into that sorted table (bitsandbytes and torchao sort theirs too).

``dynamic_map(signed, max_exponent_bits=E, total_bits=T)`` (bitsandbytes' ``create_dynamic_map``,
copied by torchao without bnb's zero padding): with ``f = T - 1`` bits beside the sign bit (the
unsigned map does not get the sign bit back: bnb computes ``T - (1 if signed else 1)``), decade
``i = 0 .. E-1`` spans ``[0.1, 1] * 10^(i-E+1)`` and holds the midpoints of ``linspace(0.1, 1, k+1)``
times that power of ten, with ``k = 2^(i+f-E)`` values (signed: mirrored to the negatives too) or
``k = 2^(i+f-E+1)`` (unsigned); then ``2^(f-E) - 1`` extra midpoints in the last decade (none for
the maps used here), and the values 0 and +1.0. Quirks, all inherited and kept:

* signed maps have **+1.0 but no -1.0**: the 8-bit map's most negative code is -0.99296875, so a
  block whose largest-magnitude m is negative stores it 0.70% short (exactly half the top decade's
  gap, the largest rounding error anywhere in the map); torchao's 4-bit signed map ends at -0.8875
  (11.25% short, again half its largest gap 0.225). Zero is a code (index 127 of 256, 7 of 16).
* 8-bit signed: 1, 2, 4, ..., 64 positive codes per decade from [1e-7, 1e-6) to [0.1, 1), min
  positive 5.5e-7, largest below 1 0.99296875. 8-bit unsigned: 0, then 2, 4, ..., 128 per decade,
  min positive 3.25e-7, largest below 1 0.996484375. 4-bit signed: 0, +-0.0055, +-0.0325,
  +-0.0775, +-0.2125, +-0.4375, +-0.6625, +-0.8875, +1.0.
* the peers generate in float32 arithmetic (torch ``linspace`` and products); generating in
  float64 and rounding once gives tables that differ from theirs by at most 2 float32 ulps at 72
  (8-bit signed), 100 (8-bit unsigned) and 4 (4-bit signed) of the codes. Codes and scales are
  interchangeable with bitsandbytes/torchao states; decoded values agree to those ulps, not
  bit-for-bit. (Ours does not depend on one library's ``linspace`` algorithm.)

``linear_map(total_bits=4)`` is torchao's 4-bit v map ``linspace(0, 1, 17)[1:]``: k/16 for k = 1..16,
exact in float32, and **no zero**. A v of zero (or below 1/32 of its block's absmax) is stored as
1/16 of the absmax, so every decoded v in a block is at least absmax/16, and the adaptive factor
1/(sqrt(v_hat)+eps) of any element is at most 4/sqrt(max v_hat of its block): small-gradient
elements take smaller steps than RAdam's (a block-local epsilon of about sqrt(absmax)/4), never
larger ones. That is the point of torchao's choice: with a zero code, v could decode to 0 while
m (quantised against its own absmax) decodes nonzero, and the step m/eps would explode. We follow
torchao exactly: compatible states, and the safe side of the trade. A block whose v is all zero
still decodes to exactly 0 (its scale is 0, see below). The 8-bit unsigned map *has* a zero code
(bitsandbytes' quirk, kept for compatibility): a v below ~1.6e-7 of its block's absmax decodes to
0, and such an element steps lr * m_hat * r_t * sqrt(bc2)/eps instead of .../sqrt(v), larger than
RAdam's step by sqrt(v)/eps; it takes a block whose gradient magnitudes span roughly 2500x
(sqrt(1/1.6e-7)) or more.

Choosing a code: the tie rule
=============================
A value ``x = value / scale`` (so ``-1 <= x <= 1``) gets the **nearest** code; a value exactly at the
midpoint of two neighbouring codes gets the one of **larger magnitude** (ties away from zero). The
midpoints are those of the float32 codes, exact in float64. Why not torchao's "ties go up"
(toward +inf): for v, and for positive m, it is the same rule; for negative m ties away from zero
keep the quantiser odd (``code(-x) = -code(x)`` wherever both codes exist), so ties carry no
systematic sign. bitsandbytes' binary search sends a tie to either neighbour depending on its
search path, and bnb also moves an m whose code has the wrong sign one code over (a tiny negative
m becomes -5.5e-7 * absmax instead of 0); we do not: plain nearest, so the error bound holds.

How float32 kernels decide, exactly: the kernels hold, per map, the midpoints rounded **away from
zero** to float32 (:attr:`CodeMap.thresholds`, ``T[k]`` between codes ``k`` and ``k+1``), and take

    code(x) = #{k : x >= T[k]}   if x >= 0        code(x) = #{k : x > T[k]}   if x < 0

(a binary search: 8 steps for 256 codes, 4 for 16; :func:`encode_f32` is this rule in NumPy, and
:func:`quantize_blockwise_f32` a whole float32 block quantisation, the kernels' stand-in). For
a float32 ``x`` this is *exactly* the nearest code under the tie rule: a float32 is >= a positive
midpoint iff it is >= the midpoint rounded up, and > a negative midpoint iff it is > the midpoint
rounded down. So a kernel and the oracle can only disagree through ``x`` itself: the kernel's
float32 moment differs from the oracle's float64 one by a few roundings (more where
``beta * m`` and ``(1-beta) * g`` cancel), its block absmax likewise, and it normalises with one
more rounding. Kernels therefore agree with the oracle on every code except where the float64
value lies within rounding of a decision midpoint: :func:`near_midpoint` marks those elements
(``|x - midpoint| <= ulps * 2^-24 * |x| + error / scale``), and the kernel tests exclude and count
them. Normalise with an IEEE division ``value / scale`` (not ``value * (1 / scale)``, whose
reciprocal overflows for a subnormal scale; not ``__fdividef``).

Scales, zero blocks, NaN and inf
================================
The scale of a block is the max of ``|value|`` over its real elements (padding excluded), in
float32; the oracle rounds its float64 absmax *up* to float32 so that ``|x| <= 1`` as in the kernels
(whose float32 absmax is exact). A block whose absmax is 0 stores scale 0 and the code nearest 0
everywhere (the zero code; code 0, i.e. 1/16, in the linear map) and decodes to exactly 0, as in
bitsandbytes (its kernel stores the block max, 0). torchao instead clips the scale to 1e-12, which
also distorts every nonzero block below 1e-12 (v blocks of gradients around 1e-5 are that small);
we do not clip, and a torchao state with scale 1e-12 decodes the same here. A zeroed buffer
(codes 0, scales 0) decodes to 0 in every format, so fresh state is ``zeros``. A block holding a
NaN gets a NaN scale (the max propagates NaN: CUDA's ``fmaxf`` does not, kernels must), one
holding +-inf an inf scale; such blocks (scale not in (0, inf)) store the code nearest 0 and
decode to NaN (or inf) in every element: one non-finite moment poisons its whole block. The
step's ``check_finite`` (skip the step on a NaN/inf gradient norm) is what prevents it.

Layout
======
Blocks never straddle tensors: each segment of a :class:`~fastradam.layout.FlatLayout` starts at a
multiple of the block and is padded to one (``FlatLayout(shapes, align=layout_align(format))``); any
``n`` works, its last block partial. Padding elements are never read; their codes stay what the
buffer was created with (0), and in the 4-bit format a byte shared by the last real element and
padding has its padding nibble written 0. A tensor of ``n`` elements has :meth:`BlockFormat.n_blocks`
``= ceil(n / block)`` scales and :meth:`BlockFormat.code_bytes` ``= ceil(n / codes_per_byte)`` code
bytes (n at 8 bits, as bitsandbytes). 4-bit packing follows torchao: byte ``j`` holds element
``2j`` in its high nibble and element ``2j+1`` in its low nibble (``(c[0::2] << 4) | c[1::2]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import numpy as np

from fastradam.layout import DEFAULT_ALIGN, FlatLayout, tiles

#: The two moments a block format stores, by their buffer role names.
MOMENT_ROLES = ("exp_avg", "exp_avg_sq")
#: float32's unit roundoff.
FLOAT32_UNIT = 2.0**-24


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic map ``create_dynamic_map(signed, max_exponent_bits, total_bits)``,
    re-derived in float64: ``2**total_bits`` values, sorted ascending (see the module docstring)."""
    fraction_bits = total_bits - 1  # the sign bit is not returned to unsigned maps (bnb's quirk)
    values = [0.0, 1.0]

    def decade(power: int, count: int) -> None:
        edges = np.linspace(0.1, 1.0, count + 1)
        midpoints = (edges[:-1] + edges[1:]) / 2 * 10.0**power
        values.extend(midpoints)
        if signed:
            values.extend(-midpoints)

    for i in range(max_exponent_bits):
        decade(i - max_exponent_bits + 1, 2 ** (i + fraction_bits - max_exponent_bits + (0 if signed else 1)))
    extra = 2 ** (fraction_bits - max_exponent_bits) - 1
    if extra > 0:  # the "no indicator bit" items, in the last decade as bnb does
        decade(0, extra)
    if len(values) != 2**total_bits:
        raise ValueError(f"dynamic map ({signed}, {max_exponent_bits}, {total_bits}) has {len(values)} values, "
                         f"not {2**total_bits}")
    return np.sort(np.array(values, dtype=np.float64))


def linear_map(total_bits: int = 4) -> np.ndarray:
    """torchao's unsigned linear map ``linspace(0, 1, 2**total_bits + 1)[1:]``: ``k / 2**total_bits``
    for ``k = 1 .. 2**total_bits``, float64, no zero."""
    return np.linspace(0.0, 1.0, 2**total_bits + 1)[1:]


def _round_away_from_zero_f32(values: np.ndarray) -> np.ndarray:
    """float64 ``values`` rounded to float32 away from zero (exact values stay)."""
    nearest = values.astype(np.float32)
    short = np.abs(nearest.astype(np.float64)) < np.abs(values)
    return np.where(short, np.nextafter(nearest, np.copysign(np.float32(np.inf), nearest)), nearest)


@dataclass(frozen=True)
class CodeMap:
    """A sorted table of code values (float32, as the kernels hold it): code ``c`` means
    ``values[c] * scale``."""

    name: str
    signed: bool
    values: tuple[float, ...]

    @classmethod
    def from_float64(cls, name: str, signed: bool, values: np.ndarray) -> CodeMap:
        """The map of float64 ``values``, rounded to float32 and sorted."""
        rounded = np.sort(np.asarray(values, dtype=np.float64).astype(np.float32))
        return cls(name, signed, tuple(float(v) for v in rounded))

    def __len__(self) -> int:
        return len(self.values)

    @cached_property
    def array(self) -> np.ndarray:
        """The code values as a read-only float32 array."""
        return _read_only(np.array(self.values, dtype=np.float32))

    @cached_property
    def midpoints(self) -> np.ndarray:
        """The exact (float64) midpoints between neighbouring float32 codes, ``len - 1`` of them."""
        v = np.array(self.values, dtype=np.float64)
        return _read_only((v[:-1] + v[1:]) / 2)

    @cached_property
    def thresholds(self) -> np.ndarray:
        """The kernels' decision table: :attr:`midpoints` rounded away from zero to float32."""
        return _read_only(_round_away_from_zero_f32(self.midpoints).astype(np.float32))

    @property
    def domain(self) -> tuple[float, float]:
        """The range of normalised values ``value / scale``: [-1, 1] signed, [0, 1] unsigned."""
        return (-1.0, 1.0) if self.signed else (0.0, 1.0)

    @property
    def zero_code(self) -> int:
        """The code nearest 0 (the code of 0 itself, or code 0 of the linear map)."""
        return int(np.argmin(np.abs(np.array(self.values))))

    @property
    def max_gap(self) -> float:
        """The largest gap between neighbouring codes."""
        return float(np.max(np.diff(np.array(self.values, dtype=np.float64))))

    @property
    def max_error(self) -> float:
        """The largest distance from a point of :attr:`domain` to its nearest code, so the round-trip
        error bound of a block is ``max_error * scale``: half the largest gap, or the distance from an
        end of the domain to the extreme code if larger (the linear map's 1/16 from zero)."""
        v = np.array(self.values, dtype=np.float64)
        low, high = self.domain
        return float(max(self.max_gap / 2, v[0] - low, high - v[-1]))


@dataclass(frozen=True)
class BlockFormat:
    """A blockwise format for both moments: ``bits`` per code, one float32 scale per ``block``
    elements per moment, a code map per moment role."""

    name: str
    bits: int
    block: int
    exp_avg: CodeMap
    exp_avg_sq: CodeMap
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if 8 % self.bits or self.block % (8 // self.bits):
            raise ValueError(f"{self.name}: bits must divide 8 and codes per byte the block")
        for code_map in (self.exp_avg, self.exp_avg_sq):
            if len(code_map) != 2**self.bits:
                raise ValueError(f"{self.name}: map {code_map.name} has {len(code_map)} codes, not {2**self.bits}")

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    def code_map(self, role: str) -> CodeMap:
        """The map of moment ``role`` (``"exp_avg"`` or ``"exp_avg_sq"``)."""
        if role not in MOMENT_ROLES:
            raise ValueError(f"role must be one of {MOMENT_ROLES}, got {role!r}")
        return getattr(self, role)

    def bytes_per_element(self, role: str = "exp_avg") -> float:
        """Persistent bytes per element of one moment (its code and its share of a scale)."""
        self.code_map(role)
        return self.bits / 8 + np.dtype(self.scale_dtype).itemsize / self.block

    @property
    def state_bytes_per_element(self) -> float:
        """Persistent bytes per element of both moments."""
        return sum(self.bytes_per_element(role) for role in MOMENT_ROLES)

    def step_bytes_per_element(self, param_itemsize: int, grad_itemsize: int | None = None) -> float:
        """Bytes a step moves per element: params read and written, grads read, both moments
        (codes and scales) read and written."""
        grad_itemsize = param_itemsize if grad_itemsize is None else grad_itemsize
        return 2 * param_itemsize + grad_itemsize + 2 * self.state_bytes_per_element

    def n_blocks(self, n: int) -> int:
        """Blocks of a tensor of ``n`` elements (the last one partial): also its scale count."""
        return -(-int(n) // self.block)

    scale_length = n_blocks

    def code_bytes(self, n: int) -> int:
        """Code bytes of a tensor of ``n`` elements: ``ceil(n / codes_per_byte)``."""
        return -(-int(n) // self.codes_per_byte)

    def padded_size(self, n: int) -> int:
        """``n`` rounded up to a whole number of blocks (a segment's room in a flat layout)."""
        return self.n_blocks(n) * self.block


SIGNED_8BIT = CodeMap.from_float64("dynamic-signed-8", True, dynamic_map(True, 7, 8))
UNSIGNED_8BIT = CodeMap.from_float64("dynamic-unsigned-8", False, dynamic_map(False, 7, 8))
SIGNED_4BIT = CodeMap.from_float64("dynamic-signed-4", True, dynamic_map(True, 3, 4))
LINEAR_4BIT = CodeMap.from_float64("linear-unsigned-4", False, linear_map(4))

FORMAT_8BIT = BlockFormat("8bit", bits=8, block=256, exp_avg=SIGNED_8BIT, exp_avg_sq=UNSIGNED_8BIT)
FORMAT_4BIT = BlockFormat("4bit", bits=4, block=128, exp_avg=SIGNED_4BIT, exp_avg_sq=LINEAR_4BIT)
#: Every blockwise moment format, by name.
BLOCK_FORMATS: dict[str, BlockFormat] = {f.name: f for f in (FORMAT_8BIT, FORMAT_4BIT)}

FormatLike = Union[str, BlockFormat]


def get_format(fmt: FormatLike) -> BlockFormat:
    """The :class:`BlockFormat` of a name (``"8bit"``, ``"4bit"``) or the format itself."""
    if isinstance(fmt, BlockFormat):
        return fmt
    try:
        return BLOCK_FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown block format {fmt!r}; known: {sorted(BLOCK_FORMATS)}") from None


# --- the flat layout: segments padded to the block multiple ---

def layout_align(fmt: FormatLike, align: int = DEFAULT_ALIGN) -> int:
    """The segment alignment a :class:`FlatLayout` needs for ``fmt``: a multiple of both ``align``
    and the block, so every segment starts on a block and is padded to one."""
    return math.lcm(int(align), get_format(fmt).block)


def check_layout(layout: FlatLayout, fmt: FormatLike) -> None:
    """Raise ``ValueError`` unless ``layout``'s segments start on (and are padded to) ``fmt``'s blocks."""
    block = get_format(fmt).block
    if layout.align % block:
        raise ValueError(f"layout align {layout.align} is not a multiple of the {block}-element block; "
                         f"use FlatLayout(..., align=layout_align({get_format(fmt).name!r}))")


def block_table(layout: FlatLayout, fmt: FormatLike) -> np.ndarray:
    """The ``(K, 3)`` int64 rows ``(start, stop, segment)`` of every block of ``layout``: block
    ``start // block`` of the scale buffers, its codes from byte ``start // codes_per_byte``."""
    check_layout(layout, fmt)
    arrays = layout.arrays
    return tiles(arrays.offsets, arrays.sizes, get_format(fmt).block)


def layout_buffer_lengths(layout: FlatLayout, fmt: FormatLike) -> tuple[int, int]:
    """``(code bytes, scales)`` of one moment's buffers for ``layout``."""
    check_layout(layout, fmt)
    fmt = get_format(fmt)
    return layout.size // fmt.codes_per_byte, layout.size // fmt.block


# --- 4-bit packing (torchao's order: the even element in the high nibble) ---

def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (one per ``uint8``, each < 16) packed two per byte, high nibble first; an odd
    count gets a 0 low nibble in its last byte."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    padded = np.zeros(2 * (-(-codes.size // 2)), dtype=np.uint8)
    padded[:codes.size] = codes
    return ((padded[0::2] << 4) | padded[1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int | None = None) -> np.ndarray:
    """The first ``n`` (default all) 4-bit codes of ``packed`` bytes, one per ``uint8``."""
    packed = np.asarray(packed, dtype=np.uint8).ravel()
    codes = np.stack([packed >> 4, packed & 0x0F], axis=1).ravel()
    return codes if n is None else codes[:n]


# --- the kernels' rule, in NumPy float32 ---

def encode_f32(x: np.ndarray, code_map: CodeMap) -> np.ndarray:
    """The kernels' code choice for normalised float32 values ``x``: the count of
    :attr:`CodeMap.thresholds` below ``x`` (``x >= T`` for ``x >= 0``, ``x > T`` for ``x < 0``);
    exactly the nearest code with ties away from zero, for every float32 ``x``. ``uint8``."""
    x = np.asarray(x, dtype=np.float32)
    t = code_map.thresholds
    codes = np.where(x >= 0, np.searchsorted(t, x, side="right"), np.searchsorted(t, x, side="left"))
    return codes.astype(np.uint8)


def quantize_blockwise_f32(values: np.ndarray, fmt: FormatLike, role: str) -> tuple[np.ndarray, np.ndarray]:
    """What a kernel does to float32 ``values`` (one tensor, blocks from its start): per block the
    exact float32 absmax (NaN-propagating) as the scale, ``x = value / scale`` in float32, then
    :func:`encode_f32`; a block with scale not in (0, inf) gets the code nearest 0. Returns
    ``(codes uint8 (packed at 4 bits), scales float32)``. The reference for testing kernels."""
    fmt = get_format(fmt)
    code_map = fmt.code_map(role)
    values = np.asarray(values, dtype=np.float32).ravel()
    n, block = values.size, fmt.block
    blocks = np.zeros(fmt.padded_size(n), dtype=np.float32)
    blocks[:n] = values
    blocks = blocks.reshape(-1, block)
    scales = np.max(np.abs(blocks), axis=1)  # padding is 0, so it never raises the max
    usable = (scales > 0) & (scales < np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = blocks / np.where(usable, scales, np.float32(1))[:, None]
    codes = np.where(usable[:, None], encode_f32(x, code_map), np.uint8(code_map.zero_code)).ravel()[:n]
    return (pack_nibbles(codes) if fmt.codes_per_byte == 2 else codes.astype(np.uint8)), scales.astype(np.float32)


def near_midpoint(values: np.ndarray, fmt: FormatLike, role: str, scale: np.ndarray | float, *,
                  ulps: float = 8.0, error: np.ndarray | float = 0.0) -> np.ndarray:
    """Which elements' codes a float32 kernel may legitimately choose differently from the oracle.

    Parameters
    ----------
    values : numpy.ndarray
        The oracle's float64 values before quantisation (one tensor, blocks from its start).
    fmt, role
        The format and moment (``"exp_avg"`` or ``"exp_avg_sq"``).
    scale : numpy.ndarray or float
        The block scales (one per block, as the oracle stored them) or one scale for all.
    ulps : float, default 8
        The relative window, in float32 unit roundoffs of ``x``: the kernel's rounding of the
        value, of its block absmax and of the division (about 4 without cancellation).
    error : numpy.ndarray or float, default 0
        An extra absolute bound (in the values' units, per element or one) on how far the
        kernel's float32 value may lie from ``values``: where ``beta * m`` and
        ``(1 - beta) * g`` cancel, about ``2^-24 * (|beta * m_old| + |(1 - beta) * g|)`` per rounding.

    Returns
    -------
    numpy.ndarray of bool
        True where ``x = value / scale`` lies within ``ulps * 2^-24 * |x| + error / scale`` of a
        midpoint between two codes. Blocks whose scale is not in (0, inf) have no decision to make
        (False).
    """
    fmt = get_format(fmt)
    mids = fmt.code_map(role).midpoints
    values = np.asarray(values, dtype=np.float64).ravel()
    scale = np.asarray(scale, dtype=np.float64)
    per_element = np.broadcast_to(scale, (fmt.n_blocks(values.size),)) if scale.ndim == 0 else scale
    per_element = np.repeat(per_element, fmt.block)[:values.size]
    usable = (per_element > 0) & (per_element < np.inf)
    safe = np.where(usable, per_element, 1.0)
    x = values / safe
    window = ulps * FLOAT32_UNIT * np.abs(x) + np.broadcast_to(np.asarray(error, dtype=np.float64), x.shape) / safe
    above = np.clip(np.searchsorted(mids, x), 0, mids.size - 1)
    below = np.clip(above - 1, 0, mids.size - 1)
    distance = np.minimum(np.abs(x - mids[above]), np.abs(x - mids[below]))
    return usable & (distance <= window)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array
