"""Benchmark-suite configuration: ``--full`` matrix, machine description, derived figures."""

from __future__ import annotations

import functools
import os
import platform

import pytest

import report
from fastradam.backends import numba_target


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="run the full benchmark matrix (slow)")


def pytest_collection_modifyitems(config, items):
    """Without --full, deselect the cases marked ``full``."""
    if config.getoption("--full"):
        return
    kept = [item for item in items if "full" not in item.keywords]
    deselected = [item for item in items if "full" in item.keywords]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name as the kernel reports it, with LLVM's name for the core Numba compiles
    for and its widest vectors, e.g. ``AMD EPYC (znver3, AVX2)``: a VM often reports the family
    name only, the same for CPUs years apart."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    bits = numba_target.widest_vector_bits()
    vectors = {512: "AVX-512", 256: "AVX2" if "avx2" in numba_target.compiled_features() else "AVX"}
    return f"{name} ({numba_target.compiled_cpu()}, {vectors.get(bits, f'{bits}-bit vectors')})"


def pytest_benchmark_update_machine_info(config, machine_info):
    import numba
    import torch

    machine_info["fastradam"] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "torch_threads": torch.get_num_threads(),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    report.add_derived_to_json(output_json)
