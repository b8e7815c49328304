"""Explicit 16-lane AVX-512 code for the all-bfloat16 word loop, traced from the one element update.

In the all-bfloat16 step the three exact roundings to bfloat16 (integer arithmetic, see
:mod:`fastradam.backends.numba.storage`) are about 40 % of the arithmetic, and that storage is
the one whose arithmetic can fall behind the memory. CPUs with AVX512-BF16 round 32 floats in
one instruction (``vcvtne2ps2bf16``), bit-exact for every value except two kinds: float32
subnormals (flushed to zero) and NaNs (payload kept, not the canonical quiet NaN). LLVM's loop
vectoriser makes poor use of it (8 lanes wide: a standalone loop ran 2.3x slower than with the
integer rounding), so this module writes the loop over 16 words (32 elements) at a time itself,
as LLVM IR:

1. widen the four 16-word vectors to float32 (low and high halves, as :func:`bfloat16_pair`);
2. the element update, *traced* from the same Python function the scalar loop compiles:
   :class:`Lanes` values make its ``+ - * /``, unary minus and ``np.sqrt`` emit the LLVM
   instructions Numba emits for float32 scalars (no fast-math), in the same order, on
   ``<16 x float>``; its branches on the flags are decided per loop variant (negated gradient,
   coupled weight decay, update mode), one variant per combination;
3. round and store: when no result lane is a NaN or a float32 subnormal (``vfpclassps``), the
   hardware conversion and one word permute; otherwise the exact integer rounding, lane-wise.
   The same bits either way, so results equal the scalar loop's (and the float32 step rounded).

The kernels call it where :func:`available` (AVX512-F/BW/DQ/BF16 among the CPU features Numba
compiles for) and the word views are C-contiguous; the remaining (fewer than 16) words, and
every word elsewhere, take the scalar loop.
"""

from __future__ import annotations

import itertools

import llvmlite.binding as llvm_binding
import numpy as np
from llvmlite import ir
from numba.core import cgutils

from fastradam.backends.numba.storage import pack_bfloat16_words, unpack_bfloat16_words
from fastradam.backends.numba.target import compiled_features
from fastradam.scalars import HOLD, MOMENTUM, RECTIFIED
from fastradam.spec import SCALAR_FLOATS, SCALAR_INDEX

LANES = 16  #: 32-bit words per vector: 32 bfloat16 elements, 16 float32 lanes per half
_REQUIRED_FEATURES = ("avx512f", "avx512bw", "avx512dq", "avx512bf16")
_SPECIAL_CLASSES = 0x01 | 0x20 | 0x80  #: vfpclassps classes: quiet NaN, subnormal, signalling NaN


def available() -> bool:
    """Whether Numba compiles for a CPU with the instructions this loop needs. When it does, the
    native assembly parser is initialised too (Numba initialises the target and the printer
    only), since the conversion is written as inline assembly: that pins the instruction and
    its operand order regardless of how a given LLVM names or lowers bfloat16."""
    if not compiled_features().issuperset(_REQUIRED_FEATURES):
        return False
    llvm_binding.initialize_native_asmparser()
    return True


def _splat(builder, value, lanes: int = LANES):
    """``value`` (a scalar) in every lane of a vector."""
    vector_type = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vector_type, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, None),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


class Lanes:
    """float32 lanes in an LLVM vector: Python arithmetic on them emits, lane-wise, the LLVM
    instructions Numba emits for the same arithmetic on float32 scalars without fast-math."""

    __slots__ = ("builder", "value")

    def __init__(self, builder, value):
        self.builder, self.value = builder, value

    def _new(self, value) -> Lanes:
        return Lanes(self.builder, value)

    def __bool__(self):
        raise TypeError("a branch on vector lanes cannot be traced: branch on the flags or on `x != 0` of a scalar")

    def __add__(self, other: Lanes) -> Lanes:
        return self._new(self.builder.fadd(self.value, other.value))

    def __sub__(self, other: Lanes) -> Lanes:
        return self._new(self.builder.fsub(self.value, other.value))

    def __mul__(self, other: Lanes) -> Lanes:
        return self._new(self.builder.fmul(self.value, other.value))

    def __truediv__(self, other: Lanes) -> Lanes:
        return self._new(self.builder.fdiv(self.value, other.value))

    def __neg__(self) -> Lanes:  # as Numba negates a float: -0.0 - x
        return self._new(self.builder.fsub(ir.Constant(self.value.type, [-0.0] * LANES), self.value))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if ufunc is not np.sqrt or method != "__call__" or kwargs:
            return NotImplemented
        sqrt = cgutils.get_or_insert_function(self.builder.module, ir.FunctionType(self.value.type, [self.value.type]),
                                              f"llvm.sqrt.v{LANES}f32")
        return self._new(self.builder.call(sqrt, [self.value]))


class _Uniform(Lanes):
    """A per-step scalar in every lane; ``!= 0`` answers for the loop variant being traced."""

    __slots__ = ("nonzero",)

    def __init__(self, builder, value, nonzero: bool):
        super().__init__(builder, value)
        self.nonzero = nonzero

    def __ne__(self, other) -> bool:
        if other != 0:
            raise TypeError("only `scalar != 0` is traced")
        return self.nonzero

    def __eq__(self, other) -> bool:
        if other != 0:
            raise TypeError("only `scalar == 0` is traced")
        return not self.nonzero

    __hash__ = None


def _round_special_free(builder, low, high):
    """Words of ``low``/``high`` rounded by the hardware (valid when no lane is NaN or subnormal):
    one ``vcvtne2ps2bf16`` (low halves' results in words 0-15, high in 16-31 of the 16-bit lanes),
    then interleaved into (low, high) pairs."""
    halves = ir.VectorType(ir.IntType(16), 2 * LANES)
    convert = ir.InlineAsm(ir.FunctionType(halves, [low.type, high.type]), "vcvtne2ps2bf16 $1, $2, $0", "=v,v,v")
    both = builder.call(convert, [low, high])
    pairs = [index for k in range(LANES) for index in (k, k + LANES)]
    interleaved = builder.shuffle_vector(both, ir.Constant(halves, None),
                                         ir.Constant(ir.VectorType(ir.IntType(32), 2 * LANES), pairs))
    return builder.bitcast(interleaved, ir.VectorType(ir.IntType(32), LANES))


def _any_special(builder, values):
    """i1: whether any lane of the float32 vectors ``values`` is a NaN or a subnormal."""
    masks = ir.VectorType(ir.IntType(1), LANES)
    classify = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(masks, [values[0].type, ir.IntType(32)]), "llvm.x86.avx512.fpclass.ps.512")
    found = None
    for value in values:
        mask = builder.call(classify, [value, ir.Constant(ir.IntType(32), _SPECIAL_CLASSES)])
        found = mask if found is None else builder.or_(found, mask)
    return builder.icmp_unsigned("!=", builder.bitcast(found, ir.IntType(LANES)), ir.Constant(ir.IntType(LANES), 0))


def _traced_scalars(builder, fields, coupled: bool, negate_grad: bool, update: int) -> tuple:
    """The scalars tuple the element update is traced with, for one loop variant: each real in every
    lane (L2 decay and eps_root as :class:`_Uniform`: L2 nonzero as the variant says, eps_root
    zero, as the caller guarantees), the flags as Python constants."""
    uniform = {"l2_weight_decay": coupled, "eps_root": False}
    reals = tuple(_Uniform(builder, _splat(builder, fields[SCALAR_INDEX[name]]), uniform[name]) if name in uniform
                  else Lanes(builder, _splat(builder, fields[SCALAR_INDEX[name]])) for name in SCALAR_FLOATS)
    return reals + (negate_grad, update)


def emit_word_vectors(context, builder, signature, args, element):
    """The body of an intrinsic ``(p_words, g_words, m_words, v_words, scalars) -> words done``:
    steps the first ``LANES * (n // LANES)`` 32-bit words of the four (uint32 views of bfloat16)
    arrays in place with ``element`` (the Python element update, traced) and returns that count.
    ``scalars`` is the kernels' tuple (fields as :data:`fastradam.spec.SCALARS`), with eps_root 0."""
    arrays = [context.make_array(t)(context, builder, a) for t, a in zip(signature.args[:4], args[:4])]
    intp = context.get_value_type(signature.return_type)
    vectors = builder.udiv(arrays[0].nitems, ir.Constant(intp, LANES))
    fields = [builder.extract_value(args[4], k) for k in range(len(signature.args[4].types))]
    negate, mode = fields[SCALAR_INDEX["negate_grad"]], fields[SCALAR_INDEX["mode"]]
    l2_weight_decay = fields[SCALAR_INDEX["l2_weight_decay"]]
    flags = {
        "negate": builder.icmp_unsigned("!=", negate, ir.Constant(negate.type, 0)),
        "coupled": builder.fcmp_unordered("!=", l2_weight_decay, ir.Constant(l2_weight_decay.type, 0.0)),  # Python's !=
        "mode": builder.select(builder.icmp_signed("==", mode, ir.Constant(mode.type, RECTIFIED)),
                               ir.Constant(ir.IntType(32), RECTIFIED),
                               builder.select(builder.icmp_signed("==", mode, ir.Constant(mode.type, HOLD)),
                                              ir.Constant(ir.IntType(32), HOLD), ir.Constant(ir.IntType(32), MOMENTUM))),
    }
    variant = builder.add(builder.mul(builder.zext(flags["negate"], ir.IntType(32)), ir.Constant(ir.IntType(32), 6)),
                          builder.add(builder.mul(builder.zext(flags["coupled"], ir.IntType(32)),
                                                  ir.Constant(ir.IntType(32), 3)), flags["mode"]))
    done = builder.mul(vectors, ir.Constant(intp, LANES))
    dispatch = builder.append_basic_block("word_vectors.dispatch")
    exit_block = builder.append_basic_block("word_vectors.exit")
    builder.cbranch(builder.icmp_signed(">", vectors, ir.Constant(intp, 0)), dispatch, exit_block)
    builder.position_at_end(dispatch)
    impossible = builder.append_basic_block("word_vectors.no_such_variant")
    switch = builder.switch(variant, impossible)
    word_vector = ir.VectorType(ir.IntType(32), LANES)
    for negate_grad, coupled, update in itertools.product((False, True), (False, True), (RECTIFIED, MOMENTUM, HOLD)):
        loop = builder.append_basic_block("word_vectors.loop")
        switch.add_case(ir.Constant(ir.IntType(32), 6 * negate_grad + 3 * coupled + update), loop)
        builder.position_at_end(loop)
        index = builder.phi(intp)
        index.add_incoming(ir.Constant(intp, 0), dispatch)
        offset = builder.mul(index, ir.Constant(intp, LANES))
        pointers = [builder.bitcast(builder.gep(a.data, [offset]), word_vector.as_pointer()) for a in arrays]
        halves = [unpack_bfloat16_words(builder, builder.load(ptr, align=4, typ=word_vector)) for ptr in pointers]
        scalars = _traced_scalars(builder, fields, coupled, negate_grad, update)
        results = [element(*(Lanes(builder, h[half]) for h in halves), scalars) for half in (0, 1)]
        outputs = [(results[0][k].value, results[1][k].value) for k in range(3)]  # p, m, v: (low, high)
        stores = (pointers[0], pointers[2], pointers[3])
        hardware = builder.append_basic_block("word_vectors.hardware")
        exact = builder.append_basic_block("word_vectors.exact")
        latch = builder.append_basic_block("word_vectors.latch")
        builder.cbranch(_any_special(builder, [v for pair in outputs for v in pair]), exact, hardware)
        for block, rounding in ((hardware, _round_special_free), (exact, pack_bfloat16_words)):
            builder.position_at_end(block)
            for (low, high), pointer in zip(outputs, stores):
                builder.store(rounding(builder, low, high), pointer, align=4)
            builder.branch(latch)
        builder.position_at_end(latch)
        following = builder.add(index, ir.Constant(intp, 1))
        index.add_incoming(following, latch)
        builder.cbranch(builder.icmp_signed("<", following, vectors), loop, exit_block)
    builder.position_at_end(impossible)
    builder.unreachable()  # the variant index takes only the 12 values the loops cover
    builder.position_at_end(exit_block)
    return done
