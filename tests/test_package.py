"""Package surface: light import, public names, backend discovery."""

from __future__ import annotations

import subprocess
import sys

import fastradam


def test_public_names():
    assert set(fastradam.__all__) == {
        "available_backends", "fused_step", "fused_step_layout", "fused_step_multi", "FlatLayout",
        "Flavour", "PRESETS", "KerasWarmup", "StepPlan", "__version__",
    }
    assert all(hasattr(fastradam, name) for name in fastradam.__all__)


def test_numba_backend_is_available_here():
    assert "numba" in fastradam.available_backends()


def test_import_is_light_and_loads_no_backend():
    code = (
        "import sys, time; t = time.perf_counter(); import fastradam; "
        "print(time.perf_counter() - t, 'numba' in sys.modules, 'cupy' in sys.modules)"
    )
    seconds, numba_loaded, cupy_loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert (numba_loaded, cupy_loaded) == ("False", "False")
    assert float(seconds) < 0.3
