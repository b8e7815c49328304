"""Configuration shared by tests/ and bench/: the ``gpu`` marker's skip-or-fail rule."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests without a CUDA device; with FASTRADAM_REQUIRE_GPU=1 let them fail."""
    from fastradam import available_backends

    if "cuda" in available_backends() or os.environ.get("FASTRADAM_REQUIRE_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="no CUDA device (CuPy with a GPU); set FASTRADAM_REQUIRE_GPU=1 to fail instead")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
