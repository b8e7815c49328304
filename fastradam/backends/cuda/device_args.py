"""Device arguments: the values the kernels read on the device, checked on the host without a sync.

found_inf (a 0-d device array) is read by the kernels themselves (:func:`_flag_arguments`; the
pre-passes that gate an update, check_finite and the clipping norm: :mod:`.prepass`), and so is a
given clipping norm (:func:`check_norm`). The capturable kernels read the step count and,
optionally, the learning rate on the device too (:func:`_device_scalar`, :func:`capturable_lrs`;
their tables: ``launch.group_tables``), through the type codes of :data:`VALUE_CODES`.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import cupy
import numpy as np

from fastradam.backends import backend_for
from fastradam.backends.cuda.interop import _device_id, as_array, storage_of
from fastradam.backends.cuda.launch import NO_FLAG
from fastradam.spec import DTYPE_CODES

#: Type codes of the 0-d device values the kernels read, by dtype (:data:`fastradam.spec.DTYPE_CODES`).
VALUE_CODES = DTYPE_CODES
#: dtypes a device-side step count may have.
STEP_DTYPES = (np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.float64))
#: dtypes a device-side learning rate may have.
LR_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: dtypes a given clipping norm on the device may have.
NORM_DTYPES = LR_DTYPES


def _flag_arguments(found_inf: Any, device_id: int) -> tuple[np.uint64, np.int32] | None:
    """The kernels' ``skip, skip_code`` for ``found_inf``; None when a host flag says skip."""
    if isinstance(found_inf, (bool, np.bool_)) or found_inf is None:
        return None if found_inf else NO_FLAG
    if found_inf.dtype not in VALUE_CODES:
        allowed = ", ".join(sorted({d.name for d in VALUE_CODES}))
        raise TypeError(f"found_inf must have dtype {allowed}, got {found_inf.dtype}")
    if _device_id(found_inf) != device_id:
        raise ValueError(f"found_inf is on CUDA device {_device_id(found_inf)} but params is on device {device_id}")
    return np.uint64(found_inf.data.ptr), np.int32(VALUE_CODES[found_inf.dtype])


def _device_scalar(name: str, value: Any, dtypes: Sequence[np.dtype], buffers: Sequence[cupy.ndarray],
                   shape: tuple[int, ...] = ()) -> cupy.ndarray:
    """``value`` as a CuPy array of ``shape`` (default 0-d) and one of ``dtypes`` on the buffers'
    device, sharing no memory with the written buffers (params, exp_avg, exp_avg_sq, master)."""
    kind = "a 0-d CUDA array" if shape == () else f"a CUDA array of shape {shape}"
    if backend_for((name,), (value,)).name != "cuda":
        raise TypeError(f"{name} must be {kind}, got a host {type(value).__name__}")
    array = as_array(value)
    allowed = " or ".join(d.name for d in dtypes)
    if array.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {allowed}, got {storage_of(value)}")
    if array.shape != shape:
        raise ValueError(f"{name} must be {kind}, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if _device_id(array) != _device_id(buffers[0]):
        raise ValueError(f"{name} is on CUDA device {_device_id(array)} but params is on device "
                         f"{_device_id(buffers[0])}: all buffers must be on one device")
    start = array.data.ptr
    for buffer_name, buffer in zip(("params", "exp_avg", "exp_avg_sq", "master_params"),
                                   (buffers[0], buffers[2], buffers[3], *buffers[4:])):
        if buffer.data.ptr < start + array.nbytes and start < buffer.data.ptr + buffer.nbytes:
            raise ValueError(f"{name} shares memory with {buffer_name}, which the step writes")
    return array


def capturable_lrs(lrs: Sequence[Any], segment_group: np.ndarray,
                   written: Sequence[cupy.ndarray]) -> list[float | tuple[int, int]]:
    """Each group's learning rate as :func:`launch.group_tables` takes it: a real number as a
    float, a 0-d float32/float64 array on the buffers' device (validated against the ``written``
    buffers) as ``(address, type code)``. Groups that no active segment of ``segment_group``
    uses get 0.0 and are not checked (their lr may live on another device)."""
    used = set(np.unique(segment_group[segment_group >= 0]).tolist())
    return [_lr_reference(f"lrs[{k}]", lr, written) if k in used else 0.0 for k, lr in enumerate(lrs)]


def _lr_reference(name: str, lr: Any, written: Sequence[cupy.ndarray]) -> float | tuple[int, int]:
    """A learning rate for a capturable kernel: a real number as a float, a 0-d float32/float64
    device array (validated against the ``written`` buffers) as ``(address, type code)``."""
    if isinstance(lr, numbers.Real) and not isinstance(lr, (bool, np.bool_)):
        return float(lr)
    if isinstance(lr, (bool, np.bool_, numbers.Number)):
        raise TypeError(f"{name} must be a real number or a 0-d CUDA array, got {type(lr).__name__}")
    lr_array = _device_scalar(name, lr, LR_DTYPES, written)
    return lr_array.data.ptr, VALUE_CODES[lr_array.dtype]


def check_norm(value: Any) -> cupy.ndarray:
    """A clipping norm given on the device (``StepPlan.step(grad_norm=...)``, e.g. a ``grad_norm()``
    of this backend, combined): a 0-d float32/float64 CUDA array, as the array the pre-pass kernel
    reads when the step runs (its device is checked then, against the buffers'). TypeError or
    ValueError otherwise; nothing is read (no synchronisation)."""
    if backend_for(("grad_norm",), (value,)).name != "cuda":
        raise TypeError(f"grad_norm must be a 0-d CUDA array, got a host {type(value).__name__}")
    array = as_array(value)
    if array.dtype not in NORM_DTYPES:
        raise TypeError(f"grad_norm must have dtype {' or '.join(d.name for d in NORM_DTYPES)}, "
                        f"got {storage_of(value)}")
    if array.shape != ():
        raise ValueError(f"grad_norm must be a 0-d CUDA array, got shape {array.shape}")
    return array
