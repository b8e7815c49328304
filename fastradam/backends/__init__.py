"""The backend registry: which backend owns an array, and lazy loading of its module.

A backend is a module with this protocol, which :class:`fastradam.plan.StepPlan` uses and nothing
else needs to know:

- ``storage_of(obj)`` (the storage format's name), ``as_arrays(objects)`` and ``as_array(obj)``
  (zero-copy conversion to the arrays its kernels take: 16-bit floats as bit views),
  ``check_devices(arrays, names)``, ``stream_order(objects)`` (what a bound launch must do first
  at every step, e.g. follow torch's CUDA stream; None when nothing);
- the launchers a plan binds once: ``bind_flat(p, g, m, v, master=, stochastic=)``, ``bind_segments(p, g,
  m, v, segments, master=, stochastic=)`` and ``bind_tensors(ps, gs, ms, vs, master=, stochastic=)``
  (``master``: the fp32 master or the int16 remainders, by its dtype; ``stochastic``: round bfloat16
  params stochastically, with each element's global index, :mod:`fastradam.rounding`), each returning
  ``launch(rows..., floats, ints, found_inf, check_finite, clip=None)`` over the scalar tables of
  ``scalars.pack_rows`` (a tensor list's also takes this step's ``grads=``);
- gradient clipping (:mod:`fastradam.clipping` states the rules): every launch, bound or capturable,
  takes ``clip=`` a :class:`~fastradam.clipping.Clip` (passed only when clipping) and then returns
  the norm of the unscaled active gradients: a float on the host, a 0-d float64 device array on a
  device (never synchronised); without it, None. A read-only pre-pass (the check_finite pass, when
  both are asked: one read) computes the norm, deterministically; the update multiplies each
  gradient by ``clip.inv_grad_scale * coefficient`` in place of the tables' inv_grad_scale, and
  with ``check_finite`` (or a set ``found_inf``) a NaN/inf norm skips it. ``clip.max_norm`` None
  asks for the norm alone (nothing written); ``clip.norm`` given (a float, or a device array the
  backend's ``check_norm(array)`` accepted) is the norm to clip by, and no gradient is read first.
  ``check_norm(array)`` (device backends) checks a 0-d device norm without reading it and returns
  the array its kernels read;
- ``CAPTURABLE``: whether it also has the device-step launches ``radam_step_capturable`` and
  ``radam_step_segments_capturable`` (and ``capturable_lrs``, their lr check), as the CUDA one does
  (both take ``clip=`` too: norm, coefficient and skip flag stay on the device, so the pre-pass and
  the update are a pair of launches a CUDA graph captures).

:func:`get` loads a backend by name. Claiming an array and probing availability are cheap and
import nothing heavy, so ``import fastradam`` stays light.

Arrays of immutable producers (JAX, TensorFlow) are refused here, on every device, by
:func:`refuse_immutable`: the step writes its buffers in place, and a zero-copy DLPack view
of such an array would change memory its library holds to be constant.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np

_DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged
#: The library of immutable arrays, by the top-level package of their type's module.
IMMUTABLE_PRODUCERS = {"jax": "JAX", "jaxlib": "JAX", "tensorflow": "TensorFlow"}


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


def refuse_immutable(name: str, obj: Any) -> None:
    """Raise TypeError when ``obj`` is an array of an immutable producer (a JAX array, a
    TensorFlow tensor): the step would write it in place through a zero-copy view."""
    module = type(obj).__module__
    producer = IMMUTABLE_PRODUCERS.get(module.partition(".")[0])
    if producer is not None:
        raise TypeError(
            f"{name} is a {producer} array ({module}.{type(obj).__qualname__}), which is immutable, but the "
            "step writes its buffers (params, exp_avg, exp_avg_sq, master_params) in place: copy it into "
            "a CuPy array (cupy.from_dlpack(x).copy()) or a torch tensor (torch.from_dlpack(x).clone()) "
            "and pass that"
        )


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
    Backend("numba", "fastradam.backends.numba", _is_numpy, _numba_available),
    Backend("cuda", "fastradam.backends.cuda", _is_cuda, _cuda_available),
)


def is_device_array(obj: Any) -> bool:
    """Whether ``obj`` is an array on a CUDA device (the CUDA backend's), cheaply, importing nothing."""
    return _is_cuda(obj)


def available_backends() -> list[str]:
    """Names of the backends usable on this machine, e.g. ``['numba']`` or ``['numba', 'cuda']``."""
    return [backend.name for backend in BACKENDS if backend.available()]


def backend_for(names: Sequence[str], objects: Sequence[Any]) -> Backend:
    """Return the one backend that owns every object; TypeError otherwise.

    ``names`` are the argument names, used in the error messages. Arrays of immutable producers
    are refused (:func:`refuse_immutable`) before any backend is asked, so that a JAX or
    TensorFlow array on any device gets that reason, not "no backend" or another device's.
    """
    owners = []
    for name, obj in zip(names, objects):
        if type(obj) is np.ndarray:  # the common case, without asking every backend
            owners.append((name, BACKENDS[0]))
            continue
        refuse_immutable(name, obj)
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


def get(name: str) -> ModuleType:
    """The backend module registered as ``name`` (``"numba"`` or ``"cuda"``), loaded on first use."""
    for backend in BACKENDS:
        if backend.name == name:
            return backend.load()
    raise ValueError(f"no backend named {name!r}; backends are {[backend.name for backend in BACKENDS]}")
