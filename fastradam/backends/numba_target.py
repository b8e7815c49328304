"""The CPU Numba compiles for, and the vector width each kernel asks LLVM for.

LLVM's tuning for some CPUs prefers 256-bit vectors although they have 512-bit registers
(Intel's server cores from Skylake-SP to Emerald Rapids carry the ``prefer-256-bit`` tuning
flag; AMD Zen 4/5 do not): Numba's loops there use ``ymm`` registers. Turning the flag off for
the whole process (``NUMBA_CPU_FEATURES=...,-prefer-256-bit``) would change every Numba
function the user compiles, so each kernel instead declares the width it prefers with
:func:`prefer_vector_width`, which puts LLVM's per-function attribute ``prefer-vector-width``
(clang's ``-mprefer-vector-width``) on the function LLVM vectorises. It is a preference: a CPU
without 512-bit vectors uses its widest (the attribute means nothing to non-x86 targets), and
Numba's configuration is left as the user set it.
"""

from __future__ import annotations

import platform

import numba
from numba import types
from numba.core.codegen import get_host_cpu_features
from numba.core.errors import TypingError
from numba.extending import intrinsic


def compiled_features() -> frozenset[str]:
    """The CPU features Numba compiles for, without the ``+``: ``NUMBA_CPU_FEATURES`` when set,
    else the host's as Numba reads them (honouring ``NUMBA_ENABLE_AVX``; empty where undetectable)."""
    features = numba.config.CPU_FEATURES
    if features is None:
        features = get_host_cpu_features()
    return frozenset(f[1:] for f in features.split(",") if f.startswith("+"))


def is_x86() -> bool:
    """Whether this is an x86 machine (Numba compiles for the machine it runs on)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def widest_vector_bits() -> int:
    """The widest vector registers of the features Numba compiles for: 512 (AVX-512F), 256 (AVX),
    else 128 (SSE2, the x86-64 baseline; NEON on ARM)."""
    if not is_x86():
        return 128
    features = compiled_features()
    return 512 if "avx512f" in features else 256 if "avx" in features else 128


@intrinsic
def prefer_vector_width(typingctx, bits):
    """Ask LLVM to vectorise the function being compiled with ``bits``-wide vectors where the CPU
    has them (a literal integer). Call it as the first statement of a ``prange`` body: that body
    is the function (Numba's parfor gufunc) whose loops LLVM vectorises."""
    if not isinstance(bits, types.IntegerLiteral) or bits.literal_value not in (128, 256, 512):
        raise TypingError("prefer_vector_width takes a literal 128, 256 or 512")
    attribute = f'"prefer-vector-width"="{bits.literal_value}"'

    def codegen(context, builder, signature, args):
        # llvmlite's FunctionAttributes admits LLVM's enum attributes only; a string attribute
        # written into the set is printed as it is into the textual IR, which LLVM parses.
        set.add(builder.function.attributes, attribute)
        return context.get_dummy_value()

    return types.none(bits), codegen


def native_half_conversions() -> bool:
    """Whether the CPU compiled for converts IEEE halves to and from float32 itself (x86 F16C;
    every AArch64). Elsewhere LLVM lowers the conversions to runtime calls (``__extendhfsf2``,
    ``__truncsfhf2``) that Numba's JIT does not link: the process aborts, so the kernels convert
    in integer arithmetic there (x86-64 without F16C, e.g. ``NUMBA_CPU_NAME=generic``)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return is_x86() and "f16c" in compiled_features()
