"""The backend registry: which backend owns an array, and lazy loading of its module.

A backend is a module with ``storage_of(obj)`` (the storage format's name), ``as_arrays(objects)``
and ``as_array(obj)`` (zero-copy conversion to the arrays its kernels take: 16-bit floats as bit views),
``check_devices(arrays)``, and the steps ``radam_step``, ``radam_step_segments`` and
``radam_step_tensors`` (buffers, the scalar tables of ``scalars.pack_rows``, and keyword
``master``, ``found_inf``, ``check_finite``); the CUDA one adds ``radam_step_on_device``.
Claiming an array and probing availability are cheap and import nothing heavy, so
``import fastradam`` stays light.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np

_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


@dataclass(frozen=True)
class Backend:
    """A registry entry: a name, a cheap ownership test, and the module to load on first use."""

    name: str
    module_name: str
    claims: Callable[[Any], bool]
    available: Callable[[], bool]

    def load(self) -> ModuleType:
        """Import (once) and return the backend's module."""
        return importlib.import_module(self.module_name)


def _is_numpy(obj: Any) -> bool:
    # a masked array's mask would be ignored by an in-place step: refused, not silently stepped
    return isinstance(obj, np.ndarray) and not isinstance(obj, np.ma.MaskedArray)


def _is_cuda(obj: Any) -> bool:
    module = type(obj).__module__
    if module.startswith("cupy"):
        return True
    if (module == "torch" or module.startswith("torch.")) and getattr(obj, "is_cuda", False) is True:
        return True  # a torch CUDA tensor or Parameter: its flag is cheaper than a DLPack query
    if hasattr(type(obj), "__cuda_array_interface__") and not hasattr(obj, "__dlpack_device__"):
        return True  # e.g. numba device arrays
    dlpack_device = getattr(obj, "__dlpack_device__", None)
    if dlpack_device is None or isinstance(obj, np.ndarray):
        return False
    try:
        return int(dlpack_device()[0]) in _DLPACK_CUDA_DEVICES
    except Exception:  # an object whose DLPack export fails is not ours to take
        return False


def _numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def _cuda_available() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device: CuPy raises its own runtime errors
        return False


BACKENDS = (
    Backend("numba", "fastradam.backends.numba_cpu", _is_numpy, _numba_available),
    Backend("cuda", "fastradam.backends.cuda", _is_cuda, _cuda_available),
)


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, e.g. ``['numba']`` or ``['numba', 'cuda']``."""
    return [backend.name for backend in BACKENDS if backend.available()]


def backend_for(names: Sequence[str], objects: Sequence[Any]) -> Backend:
    """Return the one backend that owns every object; TypeError otherwise.

    ``names`` are the argument names, used in the error messages.
    """
    owners = []
    for name, obj in zip(names, objects):
        if type(obj) is np.ndarray:  # the common case, without asking every backend
            owners.append((name, BACKENDS[0]))
            continue
        owner = next((b for b in BACKENDS if b.claims(obj)), None)
        if owner is None:
            raise TypeError(
                f"{name} must be a NumPy array (CPU) or a CUDA array such as a CuPy array or "
                f"a torch CUDA tensor, got {type(obj).__module__}.{type(obj).__qualname__}"
            )
        owners.append((name, owner))
    first_name, first = owners[0]
    for name, owner in owners[1:]:
        if owner is not first:
            raise TypeError(
                f"{name} is a {owner.name} array but {first_name} is a {first.name} array: "
                "all buffers must be on one device"
            )
    return first
