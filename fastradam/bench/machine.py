"""The machine the suites run on, as they record it: the CPU model and the thread counts."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name as the kernel reports it, with LLVM's name for the core Numba compiles
    for and its widest vectors, e.g. ``AMD EPYC (znver3, AVX2)``: a VM often reports the family
    name only, the same for CPUs years apart."""
    from fastradam.backends.numba import target as numba_target

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    bits = numba_target.widest_vector_bits()
    vectors = {512: "AVX-512", 256: "AVX2" if "avx2" in numba_target.compiled_features() else "AVX"}
    return f"{name} ({numba_target.compiled_cpu()}, {vectors.get(bits, f'{bits}-bit vectors')})"


def machine_info() -> dict[str, Any]:
    """What the suites add to pytest-benchmark's ``machine_info`` as ``machine_info["fastradam"]``."""
    import numba
    import torch

    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
    }
