"""Benchmark-suite configuration: ``--full`` matrix, machine description, derived figures."""

from __future__ import annotations

from fastradam.bench.machine import machine_info as fastradam_machine_info
from fastradam.bench.results import add_derived_to_json


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


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastradam"] = fastradam_machine_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    add_derived_to_json(output_json)
