"""Array adoption: CuPy, torch and DLPack / CUDA-array-interface objects as the arrays the kernels take.

Storage: float32/float64 arrays are used as they are; bfloat16 and float16 reach the kernels as
bit views (``uint16``: bfloat16 bits, ``int16``: float16 bits, as in the Numba backend). CuPy
has no bfloat16 dtype, so bfloat16 buffers are torch CUDA tensors, viewed zero-copy from their
addresses as bits (:func:`as_arrays`).

Streams: launches are asynchronous on CuPy's current stream of the buffers' device
(``cupy.cuda.get_current_stream()``). With torch tensors, that stream is first ordered after
torch's current stream on their device (an event, only when the two differ), as a DLPack export
would; torch callers who want the step on torch's stream itself wrap the call in
``cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)``.

Immutable producers: JAX arrays and TensorFlow tensors are refused
(:func:`fastradam.backends.refuse_immutable`) before any is viewed: the step writes its buffers
in place, and a DLPack view of such an array would let it write memory its library holds constant.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Sequence

import cupy
import numpy as np

from fastradam.backends import refuse_immutable

#: The bit-view dtype each 16-bit storage format reaches the kernels as (as in the Numba
#: backend): the view's dtype tells which format the bits hold.
BIT_VIEWS = {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.int16)}
#: The storage format of each array dtype the kernels take (16-bit formats: their bit views).
VIEW_STORAGE = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64",
                **{view: name for name, view in BIT_VIEWS.items()}}


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype: np.dtype) -> str:
    return dtype.name  # computed in Python by NumPy on every access: ~1 us


@functools.lru_cache(maxsize=None)
def _torch_dtype_name(dtype: Any) -> str | None:
    name = str(dtype)
    return name[len("torch."):] if name.startswith("torch.") else None


def _torch_storage(obj: Any) -> str | None:
    """``bfloat16``, ``float16``, ... for a torch tensor (by its dtype's name), else None."""
    dtype = getattr(obj, "dtype", None)
    return None if dtype is None else _torch_dtype_name(dtype)


def storage_of(obj: Any) -> str:
    """The storage format of a CUDA array: its dtype's name (``bfloat16`` for a torch bf16 tensor)."""
    if isinstance(obj, cupy.ndarray):
        return _dtype_name(obj.dtype)
    torch_storage = _torch_storage(obj)
    if torch_storage is not None:
        return torch_storage
    return _dtype_name(as_array(obj).dtype)


@functools.lru_cache(maxsize=None)
def _view_dtype(storage: str) -> np.dtype | None:
    """The dtype a CuPy view of this storage format has (16-bit floats: their bit views)."""
    if storage in BIT_VIEWS:
        return BIT_VIEWS[storage]
    try:
        return np.dtype(storage)
    except TypeError:
        return None


def _torch_view(tensor: Any, storage: str) -> cupy.ndarray | None:
    """A CuPy array over a dense, contiguous, non-empty torch CUDA tensor's memory, made from its
    address (16-bit floats as bit views); None for any other tensor (DLPack takes those).

    Unlike a DLPack export it does not order the call after torch's current stream:
    :func:`as_arrays` does that once per call.
    """
    dtype = _view_dtype(storage)
    if (dtype is None or not tensor.is_cuda or tensor.layout is not sys.modules["torch"].strided or tensor.is_neg()
            or not tensor.is_contiguous() or tensor.numel() == 0 or tensor.data_ptr() == 0):
        return None
    memory = cupy.cuda.UnownedMemory(tensor.data_ptr(), tensor.numel() * tensor.element_size(), tensor,
                                     tensor.get_device())
    return cupy.ndarray(tuple(tensor.shape), dtype, cupy.cuda.MemoryPointer(memory, 0))


def _follow_torch_stream(device_id: int) -> None:
    """Order CuPy's current stream after torch's current stream on ``device_id``, as a DLPack export
    does (an event, only when the two streams differ): what torch queued on those tensors
    (a backward pass, an unscale) happens before the step."""
    torch = sys.modules["torch"]
    # the raw handle as torch's own generated code (and Triton) reads it; the public query
    # costs ~10 us more in Python where torch lacks it
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    producer = raw(device_id) if raw is not None else torch.cuda.current_stream(device_id).cuda_stream
    consumer = cupy.cuda.get_current_stream(device_id)
    if producer != consumer.ptr:
        with cupy.cuda.Device(device_id):  # an event belongs to the device it is created on
            event = cupy.cuda.Event(block=False, disable_timing=True)
            cupy.cuda.runtime.eventRecord(event.ptr, producer)
            consumer.wait_event(event)


def stream_order(objects: Sequence[Any]) -> Callable[[], None] | None:
    """What a bound launch over ``objects`` must do first, at every step: order CuPy's current
    stream after torch's (as :func:`as_arrays` does once per conversion) when any is a torch CUDA
    tensor; None otherwise."""
    for obj in objects:
        if _torch_storage(obj) is not None and getattr(obj, "is_cuda", False):
            return functools.partial(_follow_torch_stream, obj.get_device())
    return None


def as_arrays(objects: Sequence[Any]) -> list[cupy.ndarray]:
    """``objects`` as the CuPy arrays the kernels take, sharing their memory (no copy).

    CuPy arrays are themselves (float16 ones viewed as bits). A torch CUDA tensor is viewed from
    its address, as its dtype or, for bfloat16/float16, as bits (CuPy has no bfloat16 and
    DLPack cannot carry it): ``uint16`` holds bfloat16 bits, ``int16`` float16 bits; then CuPy's
    current stream is ordered once after torch's (as DLPack's per-tensor handshake would).
    Other objects (a tensor that is not dense and contiguous, Numba device arrays) cross through
    DLPack or ``__cuda_array_interface__``; JAX arrays and TensorFlow tensors, immutable, are
    refused with a TypeError (:func:`fastradam.backends.refuse_immutable`).
    """
    arrays, torch_device = [], None
    for obj in objects:
        if isinstance(obj, cupy.ndarray):
            view = BIT_VIEWS.get(_dtype_name(obj.dtype))
            arrays.append(obj if view is None else obj.view(view))
            continue
        storage = _torch_storage(obj)
        array = None if storage is None else _torch_view(obj, storage)
        if array is not None:
            torch_device = array.data.device_id
        elif storage is not None:
            tensor = obj.detach()
            if storage in BIT_VIEWS:
                import torch

                tensor = tensor.view(torch.int16)
            array = cupy.from_dlpack(tensor)
        else:
            refuse_immutable("an array given to the CUDA backend", obj)
            if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
                array = cupy.from_dlpack(obj)
            else:
                array = cupy.asarray(obj)
        view = BIT_VIEWS.get(storage or _dtype_name(array.dtype))
        arrays.append(array if view is None or array.dtype == view else array.view(view))
    if torch_device is not None:
        _follow_torch_stream(torch_device)
    return arrays


def as_array(obj: Any) -> cupy.ndarray:
    """One object as :func:`as_arrays` takes it."""
    return as_arrays((obj,))[0]


def _device_id(array: cupy.ndarray) -> int:
    return array.data.device_id


def check_devices(arrays: Sequence[cupy.ndarray], names: Sequence[str] = ("params", "grads", "exp_avg", "exp_avg_sq")) -> None:
    """Raise ValueError unless every CuPy array lives on the first one's device."""
    first = _device_id(arrays[0])
    for name, array in zip(names, arrays):
        if _device_id(array) != first:
            raise ValueError(f"{name} is on CUDA device {_device_id(array)} but {names[0]} is on "
                             f"device {first}: all buffers must be on one device")
