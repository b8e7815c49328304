"""The CPU Numba compiles for, and the vector width each kernel asks LLVM for.

LLVM's tuning for some CPUs prefers 256-bit vectors although they have 512-bit registers
(Intel's server cores from Skylake-SP to Emerald Rapids carry the ``prefer-256-bit`` tuning
flag; AMD Zen 4/5 do not): Numba's loops there use ``ymm`` registers. Turning the flag off for
the whole process (``NUMBA_CPU_FEATURES=...,-prefer-256-bit``) would change every Numba
function the user compiles, so each kernel instead declares the width it prefers with
:func:`prefer_vector_width`, which puts LLVM's per-function attribute ``prefer-vector-width``
(clang's ``-mprefer-vector-width``) on the function LLVM vectorises. It is a preference: a CPU
without 512-bit vectors uses its widest (the attribute means nothing to non-x86 targets), and
Numba's configuration is left as the user set it. On the first AVX-512 generations
(:data:`DOWNCLOCKING_CORES`: Skylake-SP to Cooper Lake) the kernels leave LLVM's 256-bit
choice alone: there 512-bit floating-point work lowers the core's clock for everything it runs.
"""

from __future__ import annotations

import platform

import llvmlite.binding
import numba
from numba import types
from numba.core.codegen import get_host_cpu_features
from numba.core.errors import TypingError
from numba.extending import intrinsic

#: LLVM's names of the cores whose clock drops under 512-bit floating-point work (AVX-512
#: "license" levels): a kernel's 512-bit preference is not applied there.
DOWNCLOCKING_CORES = frozenset({"skylake-avx512", "skx", "cascadelake", "cooperlake"})


def _feature_string() -> str:
    """``NUMBA_CPU_FEATURES`` when set, else the host's features as Numba reads them (honouring
    ``NUMBA_ENABLE_AVX``; empty where undetectable)."""
    features = numba.config.CPU_FEATURES
    return get_host_cpu_features() if features is None else features


def compiled_features() -> frozenset[str]:
    """The CPU features Numba compiles for (enabled ones, without the ``+``)."""
    return frozenset(f[1:] for f in _feature_string().split(",") if f.startswith("+"))


def compiled_cpu() -> str:
    """The LLVM name of the CPU Numba compiles for: ``NUMBA_CPU_NAME``, else the host's."""
    return numba.config.CPU_NAME or llvmlite.binding.get_host_cpu_name()


def is_x86() -> bool:
    """Whether this is an x86 machine (Numba compiles for the machine it runs on)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def widest_vector_bits() -> int:
    """The widest vector registers of the features Numba compiles for: 512 (AVX-512F, unless
    limited to 256 bits by ``-evex512``), 256 (AVX), else 128 (SSE2, the x86-64 baseline; NEON
    on ARM, whose scalable SVE vectors are left to LLVM)."""
    if not is_x86():
        return 128
    features = compiled_features()
    if "avx512f" in features and "-evex512" not in _feature_string().split(","):
        return 512
    return 256 if "avx" in features else 128


def chosen_vector_bits(bits: int) -> int:
    """The vector width a kernel that prefers ``bits`` gets on the CPU Numba compiles for (x86):
    ``bits`` where the CPU has them, its widest where narrower, 256 on :data:`DOWNCLOCKING_CORES`."""
    widest = widest_vector_bits()
    if compiled_cpu() in DOWNCLOCKING_CORES:
        return min(widest, 256)
    return min(widest, bits)


def native_half_conversions() -> bool:
    """Whether the CPU compiled for converts IEEE halves to and from float32 itself (x86 F16C;
    every AArch64). Elsewhere LLVM lowers the conversions to runtime calls (``__extendhfsf2``,
    ``__truncsfhf2``) that Numba's JIT does not link: the process aborts, so the kernels convert
    in integer arithmetic there (x86-64 without F16C, e.g. ``NUMBA_CPU_NAME=generic``)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    return is_x86() and "f16c" in compiled_features()


@intrinsic
def prefer_vector_width(typingctx, bits):
    """Ask LLVM to vectorise the function being compiled with ``bits``-wide vectors where the CPU
    has them (a literal integer; not on :data:`DOWNCLOCKING_CORES`). Call it as the first
    statement of a ``prange`` body: that body is the function (Numba's parfor gufunc) whose
    loops LLVM vectorises."""
    if not isinstance(bits, types.IntegerLiteral) or bits.literal_value not in (128, 256, 512):
        raise TypingError("prefer_vector_width takes a literal 128, 256 or 512")
    attribute = f'"prefer-vector-width"="{bits.literal_value}"'

    def codegen(context, builder, signature, args):
        if compiled_cpu() not in DOWNCLOCKING_CORES:
            try:
                # llvmlite's FunctionAttributes admits LLVM's enum attributes only; a string
                # attribute written into the set is printed as it is into the textual IR, which
                # LLVM parses. Should a later llvmlite refuse it, the preference is dropped (the
                # code-generation tests then fail), never the kernel.
                set.add(builder.function.attributes, attribute)
            except TypeError:
                pass
        return context.get_dummy_value()

    return types.none(bits), codegen
