"""x86 CPUs other than this one, for Numba to compile for (``NUMBA_CPU_NAME`` + ``NUMBA_CPU_FEATURES``).

:data:`TARGETS` spans what users run: x86-64-v2 (128-bit SSE4.2 vectors, no F16C: the oldest
CPUs in use, and the half conversions in integer arithmetic), AVX2 laptops and desktops, and
two Intel server cores whose LLVM tuning prefers 256-bit vectors although they have AVX-512:
Sapphire/Emerald Rapids (with AVX512-BF16), where the kernels ask for 512, and Skylake-SP,
where they do not. The feature lists name what the kernels ask about (see
:mod:`fastradam.backends.numba.target`); LLVM adds the rest of the named CPU's features.

``python -m tests.cpu_targets`` runs the CPU kernels' suites once more, side by side, for each
target whose vectors are narrower than this CPU's (its code runs here): on an AVX-512 machine
AVX2 and x86-64-v2, on an AVX2 machine x86-64-v2; so every CI run also covers the CPUs it is
not on.
(The plain x86-64 baseline, SSE2 only, as ``NUMBA_CPU_NAME=generic`` gives it, is left out:
without SSE4.1's blends LLVM keeps the square root scalar; the results are the same.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fastradam.backends.numba import target as numba_target

_AVX2 = "+avx,+avx2,+f16c,+fma"
_AVX512 = _AVX2 + ",+avx512f,+avx512bw,+avx512dq,+avx512vl"
#: name -> (LLVM CPU name, features, widest vector bits, the width the kernels get there)
TARGETS = {
    "x86-64-v2 (SSE4.2, no F16C)": ("x86-64-v2", "+sse4.2", 128, 128),
    "AVX2 (haswell)": ("haswell", _AVX2, 256, 256),
    # LLVM tunes both Intel server cores for 256-bit vectors; the kernels override that on
    # Sapphire/Emerald Rapids (one LLVM tuning) and leave it on Skylake-SP, which downclocks.
    "Intel Sapphire/Emerald Rapids (AVX-512 + BF16)": ("sapphirerapids", _AVX512 + ",+avx512bf16", 512, 512),
    "Intel Skylake-SP (AVX-512, downclocks under it)": ("skylake-avx512", _AVX512, 512, 256),
}
#: The suites of the CPU kernels, rerun for each narrower target ...
SUITES = ("tests/test_numba.py", "tests/test_numba_storage.py", "tests/test_mixed_precision.py")
#: ... less the code-generation tests: the main run compiles for every target already.
DESELECTED = "not x86_target and not vectorised and not word_loop and not explicit_avx512_loop"
ROOT = Path(__file__).resolve().parents[1]


def environment(name: str, cache_dir: str) -> dict[str, str]:
    """This process's environment with Numba compiling for target ``name`` into ``cache_dir``."""
    cpu, features, _, _ = TARGETS[name]
    return {**os.environ, "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": features, "NUMBA_CACHE_DIR": cache_dir}


def narrower_targets() -> list[str]:
    """The targets whose code runs on this CPU: x86, with narrower vectors than it has."""
    if not numba_target.is_x86():
        return []
    return [name for name, (_, _, bits, _) in TARGETS.items() if bits < numba_target.widest_vector_bits()]


def main(timeout_s: float = 1500) -> int:
    """Run the suites for every narrower target at once (compiling is mostly single-threaded), each
    printed whole when it ends; the exit status is the first failing run's, else 0. A run still
    going after ``timeout_s`` is killed (and fails); so are the others if this one is stopped."""
    names = narrower_targets()
    if not names:
        print("no narrower x86 target to run on this CPU", flush=True)
    status = 0
    with tempfile.TemporaryDirectory() as folder:
        runs = []
        try:
            for k, name in enumerate(names):
                log = open(Path(folder) / f"{k}.log", "w+")
                command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *SUITES, "-k", DESELECTED]
                runs.append((name, log, subprocess.Popen(
                    command, env=environment(name, str(Path(folder) / f"cache{k}")), cwd=ROOT, stdout=log,
                    stderr=subprocess.STDOUT)))
            for name, log, run in runs:
                try:
                    code = run.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    run.kill()
                    code = run.wait()
                    print(f"the run for {name} passed {timeout_s:.0f} s and was stopped", flush=True)
                log.seek(0)
                print(f"\n=== the CPU kernels' suites compiled for {name} ===\n{log.read()}", flush=True)
                status = status or code
        finally:
            for _, log, run in runs:
                if run.poll() is None:
                    run.kill()
                    run.wait()
                log.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
