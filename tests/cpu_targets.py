"""x86 CPUs other than this one, for Numba to compile for (``NUMBA_CPU_NAME`` + ``NUMBA_CPU_FEATURES``).

:data:`TARGETS` spans what users run: x86-64-v2 (128-bit SSE4.2 vectors, no F16C: the oldest
CPUs in use, and the half conversions in integer arithmetic), AVX2 laptops and desktops, and an
Intel server core, whose LLVM tuning prefers 256-bit vectors although it has
AVX-512 and AVX512-BF16. The feature lists name what the kernels ask about (see
:mod:`fastradam.backends.numba_target`); LLVM adds the rest of the named CPU's features.

``python -m tests.cpu_targets`` runs the CPU kernels' suites once more for each target whose
vectors are narrower than this CPU's (its code runs here): on an AVX-512 machine AVX2 and
x86-64-v2, on an AVX2 machine x86-64-v2; so every CI run also covers the CPUs it is not on.
(The plain x86-64 baseline, SSE2 only, as ``NUMBA_CPU_NAME=generic`` gives it, is left out:
without SSE4.1's blends LLVM keeps the square root scalar; the results are the same.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fastradam.backends import numba_target

_AVX2 = "+avx,+avx2,+f16c,+fma"
#: name -> (LLVM CPU name, features, widest vector bits)
TARGETS = {
    "x86-64-v2 (SSE4.2, no F16C)": ("x86-64-v2", "+sse4.2", 128),
    "AVX2 (haswell)": ("haswell", _AVX2, 256),
    "Intel Emerald Rapids (AVX-512 + BF16, tuned for 256-bit)":
        ("emeraldrapids", _AVX2 + ",+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512bf16", 512),
}
#: The suites of the CPU kernels, rerun for each narrower target.
SUITES = ("tests/test_numba.py", "tests/test_numba_storage.py", "tests/test_mixed_precision.py")
ROOT = Path(__file__).resolve().parents[1]


def environment(name: str, cache_dir: str) -> dict[str, str]:
    """This process's environment with Numba compiling for target ``name`` into ``cache_dir``."""
    cpu, features, _ = TARGETS[name]
    return {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": cache_dir}


def narrower_targets() -> list[str]:
    """The targets whose code runs on this CPU: x86, with narrower vectors than it has."""
    if not numba_target.is_x86():
        return []
    return [name for name, (_, _, bits) in TARGETS.items() if bits < numba_target.widest_vector_bits()]


def main() -> int:
    names = narrower_targets()
    if not names:
        print("no narrower x86 target to run on this CPU", flush=True)
    for name in names:
        print(f"\n=== the CPU kernels' suites compiled for {name} ===", flush=True)
        with tempfile.TemporaryDirectory() as cache:
            status = subprocess.call([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *SUITES,
                                      "-k", "not x86_target"],  # compiled for every target already
                                     env=environment(name, cache), cwd=ROOT)
        if status != 0:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
