"""Benchmark-suite configuration: ``--full`` matrix, machine description, derived figures."""

from __future__ import annotations

import os
import platform

import pytest

import report


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


def cpu_model() -> str:
    """The CPU's model name, as the kernel reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
