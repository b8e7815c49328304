"""CUDA backend: the templated kernels of ``kernels/radam.cu``, compiled by CuPy, run on its current stream.

The source is compiled lazily on first use with NVRTC for the current device's architecture
and cached by CuPy (``~/.cupy/kernel_cache``); one ``RawModule`` holds every dtype variant,
instantiated from the templates with ``name_expressions``.

Notes
-----
- Launches are asynchronous on CuPy's current stream of the buffers' device
  (``cupy.cuda.get_current_stream()``); nothing synchronises the host. Torch callers who want
  torch's stream wrap the call in ``cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)``.
- Compiled with ``--fmad=false``: no multiply-add contraction, so the GPU rounds like the oracle,
  the Numba backend and the CPU harness of the same source; the step is memory-bound, so
  contraction would buy no speed. CuPy itself appends ``-ftz=true``: float32 subnormals flush
  to zero on the GPU (float64 is unaffected).
- Grid: ``min(ceil(n / (block * lanes)), SMs * blocks_per_SM)`` blocks of 256 threads, each
  thread striding over 16-byte packs (``lanes`` = 4 floats or 2 doubles).
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
from pathlib import Path
from typing import Any, Sequence

import cupy
import numpy as np

from fastradam.backends import backend_for
from fastradam.scalars import StepScalars

#: The kernel source, relative to the kernel folder (``fastradam.kernels`` when installed).
KERNEL_FILE = "radam.cu"
#: NVRTC options the backend compiles with (CuPy adds ``-arch`` and ``-ftz=true``).
COMPILE_OPTIONS = ("--std=c++17", "--fmad=false")

#: C++ storage type of each buffer dtype (the math type is ``MathType<T>`` in radam.cuh).
STORAGE_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
#: C++ type of a device-side step count, by dtype.
STEP_TYPES = {
    np.dtype(np.int32): "int",
    np.dtype(np.int64): "long long",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}
#: C++ type of the learning-rate argument: ``None`` for a host number, else the device dtype.
LR_TYPES = {None: "double", np.dtype(np.float32): "const float*", np.dtype(np.float64): "const double*"}

BLOCK = 256
BLOCKS_PER_SM = 8
_PACK_BYTES = 16


def step_kernel_name(dtype: np.dtype) -> str:
    """Name expression of the kernel that takes host scalars, for buffers of ``dtype``."""
    return f"fastradam::radam_step<{STORAGE_TYPES[np.dtype(dtype)]}>"


def capturable_kernel_name(dtype: np.dtype, step_dtype: np.dtype, lr_dtype: np.dtype | None) -> str:
    """Name expression of the capturable kernel (step, and lr unless ``lr_dtype`` is None, on the device)."""
    lr_type = LR_TYPES[None if lr_dtype is None else np.dtype(lr_dtype)]
    return (f"fastradam::radam_step_capturable<{STORAGE_TYPES[np.dtype(dtype)]}, "
            f"{STEP_TYPES[np.dtype(step_dtype)]}, {lr_type}>")


#: Every template instantiation the backend launches.
NAME_EXPRESSIONS = tuple(
    [step_kernel_name(dtype) for dtype in STORAGE_TYPES]
    + [capturable_kernel_name(dtype, step_dtype, lr_dtype)
       for dtype in STORAGE_TYPES for step_dtype in STEP_TYPES for lr_dtype in LR_TYPES]
)


def kernel_dir() -> Path:
    """The folder holding the CUDA sources.

    A regular install ships them as ``fastradam/kernels``; in the source tree (editable
    install, or ``PYTHONPATH=.``) they are the top-level ``kernels/`` beside ``fastradam/``.
    """
    package = Path(__file__).resolve().parents[1]
    installed = package / "kernels"
    return installed if (installed / KERNEL_FILE).is_file() else package.parent / "kernels"


def kernel_source() -> str:
    """The text of ``radam.cu``, tagged with a hash of the headers so CuPy's cache sees them change."""
    folder = kernel_dir()
    headers = hashlib.sha256()
    for header in sorted(folder.glob("*.cuh")):
        headers.update(header.read_bytes())
    source = (folder / KERNEL_FILE).read_text()
    return f"{source}\n// headers sha256 {headers.hexdigest()}\n"


@functools.lru_cache(maxsize=None)
def _module(device_id: int) -> cupy.RawModule:
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=kernel_source(),
            options=COMPILE_OPTIONS + (f"-I{kernel_dir()}",),
            name_expressions=NAME_EXPRESSIONS,
        )


@functools.lru_cache(maxsize=None)
def _kernel(device_id: int, name: str) -> cupy.RawKernel:
    with cupy.cuda.Device(device_id):
        return _module(device_id).get_function(name)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _grid(n: int, dtype: np.dtype, device_id: int) -> int:
    lanes = _PACK_BYTES // dtype.itemsize
    return max(1, min(math.ceil(n / (BLOCK * lanes)), _sm_count(device_id) * BLOCKS_PER_SM))


def as_array(obj: Any) -> cupy.ndarray:
    """Return ``obj`` as a CuPy array sharing its memory (DLPack or ``__cuda_array_interface__``)."""
    if isinstance(obj, cupy.ndarray):
        return obj
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return cupy.from_dlpack(obj)
    return cupy.asarray(obj)


def _device_id(array: cupy.ndarray) -> int:
    return int(array.device.id)


def check_devices(arrays: Sequence[cupy.ndarray], names: Sequence[str] = ("params", "grads", "exp_avg", "exp_avg_sq")) -> None:
    """Raise ValueError unless every CuPy array lives on the first one's device."""
    first = _device_id(arrays[0])
    for name, array in zip(names, arrays):
        if _device_id(array) != first:
            raise ValueError(f"{name} is on CUDA device {_device_id(array)} but {names[0]} is on "
                             f"device {first}: all buffers must be on one device")


def radam_step(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray,
               exp_avg_sq: cupy.ndarray, scalars: StepScalars) -> None:
    """Launch one RAdam step, in place, on validated C-contiguous CuPy buffers of one dtype.

    The float64 host scalars are rounded to the buffer dtype (``np.float32(...)``: CuPy would
    pass a Python float as a double unchecked). Asynchronous on CuPy's current stream.
    """
    n = params.size
    if n == 0:
        return
    cast = params.dtype.type
    device_id = _device_id(params)
    with cupy.cuda.Device(device_id):
        _kernel(device_id, step_kernel_name(params.dtype))(
            (_grid(n, params.dtype, device_id),), (BLOCK,),
            (params, grads, exp_avg, exp_avg_sq, np.int64(n),
             cast(scalars.one_minus_beta1), cast(scalars.beta2), cast(scalars.one_minus_beta2),
             cast(scalars.eps), cast(scalars.l2_weight_decay), cast(scalars.param_decay),
             cast(scalars.step_size), np.int32(scalars.negate_grad), np.int32(scalars.rectified)),
        )


def _device_scalar(name: str, value: Any, dtypes: Sequence[np.dtype], buffers: Sequence[cupy.ndarray]) -> cupy.ndarray:
    if backend_for((name,), (value,)).name != "cuda":
        raise TypeError(f"{name} must be a 0-d CUDA array, got a host {type(value).__name__}")
    array = as_array(value)
    allowed = " or ".join(d.name for d in dtypes)
    if array.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {allowed}, got {array.dtype}")
    if array.ndim != 0:
        raise ValueError(f"{name} must be a 0-d device array, got shape {array.shape}")
    if _device_id(array) != _device_id(buffers[0]):
        raise ValueError(f"{name} is on CUDA device {_device_id(array)} but params is on device "
                         f"{_device_id(buffers[0])}: all buffers must be on one device")
    start = array.data.ptr
    for buffer_name, buffer in zip(("params", "exp_avg", "exp_avg_sq"), (buffers[0], buffers[2], buffers[3])):
        if buffer.data.ptr < start + array.itemsize and start < buffer.data.ptr + buffer.nbytes:
            raise ValueError(f"{name} shares memory with {buffer_name}, which the step writes")
    return array


def radam_step_on_device(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray,
                         exp_avg_sq: cupy.ndarray, step: Any, lr: Any, *, beta1: float, beta2: float,
                         eps: float, weight_decay: float, decoupled_weight_decay: bool,
                         maximize: bool) -> None:
    """Launch one capturable RAdam step whose step count (and optionally lr) live on the device.

    The kernel reads ``step`` (and ``lr``) when it runs and folds the scalars of
    :func:`fastradam.scalars.step_scalars` itself, in float64 (``radam_step_scalars`` in
    radam.cuh), so the launch can be captured in a CUDA graph and replayed while the step
    advances on the device. Nothing synchronises the host.

    Parameters
    ----------
    params, grads, exp_avg, exp_avg_sq : cupy.ndarray
        Validated buffers, as for :func:`radam_step`.
    step : cupy.ndarray or DLPack / CUDA-array-interface object
        0-d int32, int64, float32 or float64 on the buffers' device: the 1-based step of this
        update (torch's capturable ``state["step"]`` after its increment). Its value must be
        >= 1; it is not checked (that would synchronise).
    lr : float or 0-d device array
        A real number (passed by value) or a 0-d float32/float64 array on the buffers' device.
    beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize
        Validated hyperparameters, as for :func:`fastradam.scalars.step_scalars`.

    Raises
    ------
    TypeError
        ``step`` or ``lr`` has an unsupported dtype, or ``lr`` is neither a real number nor an array.
    ValueError
        ``step`` or ``lr`` is not 0-d, is on another device, or overlaps a written buffer.
    """
    step_array = _device_scalar("step", step, tuple(STEP_TYPES), (params, grads, exp_avg, exp_avg_sq))
    if isinstance(lr, numbers.Real) and not isinstance(lr, (bool, np.bool_)):
        lr_arg, lr_dtype = np.float64(lr), None
    elif isinstance(lr, (bool, np.bool_, numbers.Number)):
        raise TypeError(f"lr must be a real number or a 0-d CUDA array, got {type(lr).__name__}")
    else:
        lr_arg = _device_scalar("lr", lr, (np.dtype(np.float32), np.dtype(np.float64)),
                                (params, grads, exp_avg, exp_avg_sq))
        lr_dtype = lr_arg.dtype
    n = params.size
    if n == 0:
        return
    device_id = _device_id(params)
    name = capturable_kernel_name(params.dtype, step_array.dtype, lr_dtype)
    with cupy.cuda.Device(device_id):
        _kernel(device_id, name)(
            (_grid(n, params.dtype, device_id),), (BLOCK,),
            (params, grads, exp_avg, exp_avg_sq, np.int64(n), step_array, lr_arg,
             np.float64(beta1), np.float64(beta2), np.float64(eps), np.float64(weight_decay),
             np.int32(decoupled_weight_decay), np.int32(maximize)),
        )
