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
  thread striding over 16-byte packs (``lanes`` = 4 floats or 2 doubles). The multi-tensor
  kernels cut the work into :data:`TILE`-element tiles (``fastradam.layout.tiles``) and launch
  ``min(tiles, SMs * blocks_per_SM)`` blocks, each taking tiles in turn.
- Tables: a flat step passes its one row of scalars by value (no copy). A layout's tile table
  goes to the device once per device (cached in ``SegmentArrays.derived["cuda"]``); the small
  per-call tables (rows, scalars, a tensor list's pointers and tiles) go in one asynchronous
  host-to-device copy on the current stream, into memory from CuPy's pool (which reuses a
  block only on the stream it was freed on, so a later call cannot overwrite a table that a
  queued launch still reads).
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
from fastradam.flavours import PRESETS, Flavour, resolve_flavour
from fastradam.layout import SegmentArrays, tiles

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
#: Elements per tile of the multi-tensor kernels: a multiple of the 64-element layout alignment
#: (so tiles of an aligned layout stay 16-byte co-aligned) and of BLOCK * 4 float32 lanes.
TILE = 4096
_PACK_BYTES = 16
#: Byte alignment of each table inside the one per-call upload.
_TABLE_ALIGN = 16


def step_kernel_name(dtype: np.dtype) -> str:
    """Name expression of the kernel that takes host scalars, for buffers of ``dtype``."""
    return f"fastradam::radam_step<{STORAGE_TYPES[np.dtype(dtype)]}>"


def segments_kernel_name(dtype: np.dtype) -> str:
    """Name expression of the kernel over the segments of flat buffers, for ``dtype``."""
    return f"fastradam::radam_step_segments<{STORAGE_TYPES[np.dtype(dtype)]}>"


def tensors_kernel_name(dtype: np.dtype) -> str:
    """Name expression of the kernel over a list of separate tensors, for ``dtype``."""
    return f"fastradam::radam_step_tensors<{STORAGE_TYPES[np.dtype(dtype)]}>"


def capturable_kernel_name(dtype: np.dtype, step_dtype: np.dtype, lr_dtype: np.dtype | None) -> str:
    """Name expression of the capturable kernel (step, and lr unless ``lr_dtype`` is None, on the device)."""
    lr_type = LR_TYPES[None if lr_dtype is None else np.dtype(lr_dtype)]
    return (f"fastradam::radam_step_capturable<{STORAGE_TYPES[np.dtype(dtype)]}, "
            f"{STEP_TYPES[np.dtype(step_dtype)]}, {lr_type}>")


#: Every template instantiation the backend launches.
NAME_EXPRESSIONS = tuple(
    [name(dtype) for name in (step_kernel_name, segments_kernel_name, tensors_kernel_name)
     for dtype in STORAGE_TYPES]
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


def _tile_grid(n_tiles: int, device_id: int) -> int:
    return max(1, min(n_tiles, _sm_count(device_id) * BLOCKS_PER_SM))


def pack_tables(*tables: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
    """One host byte buffer holding ``tables`` (C order), each at a 16-byte-aligned byte offset.

    Returns the buffer and the offsets, so the per-call tables cross to the device in one copy.
    """
    offsets, end = [], 0
    for table in tables:
        start = -(-end // _TABLE_ALIGN) * _TABLE_ALIGN
        offsets.append(start)
        end = start + table.nbytes
    packed = np.zeros(end, dtype=np.uint8)
    for table, start in zip(tables, offsets):
        packed[start:start + table.nbytes] = np.ascontiguousarray(table).reshape(-1).view(np.uint8)
    return packed, tuple(offsets)


def _upload(*tables: np.ndarray) -> list[cupy.ndarray]:
    """Device copies of ``tables`` (1-D views into one pooled allocation), by one async copy."""
    packed, offsets = pack_tables(*tables)
    device = cupy.empty(packed.size, dtype=np.uint8)
    device.set(packed, stream=cupy.cuda.get_current_stream())
    return [device[start:start + table.nbytes].view(table.dtype) for table, start in zip(tables, offsets)]


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
               exp_avg_sq: cupy.ndarray, floats: np.ndarray, ints: np.ndarray) -> None:
    """Launch one RAdam step, in place, on validated C-contiguous CuPy buffers of one dtype.

    ``floats`` (1, 7) in the buffers' dtype and ``ints`` (1, 2) int32 are the host tables of
    :func:`fastradam.scalars.pack_rows`; row 0 is passed by value, as NumPy scalars of exactly
    the kernel's parameter types (CuPy would pass a Python float as a double unchecked).
    Asynchronous on CuPy's current stream.
    """
    n = params.size
    if n == 0:
        return
    device_id = _device_id(params)
    row = (*np.asarray(floats, dtype=params.dtype)[0], *np.asarray(ints, dtype=np.int32)[0])
    with cupy.cuda.Device(device_id):
        _kernel(device_id, step_kernel_name(params.dtype))(
            (_grid(n, params.dtype, device_id),), (BLOCK,),
            (params, grads, exp_avg, exp_avg_sq, np.int64(n), *row),
        )


def _layout_tiles(segments: SegmentArrays, device_id: int) -> cupy.ndarray:
    """The layout's tile table on ``device_id``: built on the host and uploaded once per device."""
    cached = segments.derived.setdefault("cuda", {})
    if "tiles" not in cached:
        cached["tiles"] = tiles(segments.offsets, segments.sizes, TILE)
    if device_id not in cached:
        with cupy.cuda.Device(device_id):
            cached[device_id] = cupy.asarray(cached["tiles"])
    return cached[device_id]


def radam_step_segments(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray,
                        exp_avg_sq: cupy.ndarray, segments: SegmentArrays, segment_row: np.ndarray,
                        floats: np.ndarray, ints: np.ndarray) -> None:
    """One launch over the segments of flat buffers; segment ``i`` uses row ``segment_row[i]`` (< 0: skipped).

    ``segment_row`` (int32, one per segment), ``floats`` (R, 7, the buffers' dtype) and ``ints``
    (R, 2, int32) are host arrays, uploaded in one asynchronous copy; the layout's tile table is
    uploaded once per device. Skipped segments and the padding are neither read nor written.
    """
    device_id = _device_id(params)
    segment_row = np.asarray(segment_row, dtype=np.int32)
    with cupy.cuda.Device(device_id):
        tile_rows = _layout_tiles(segments, device_id)
        if tile_rows.shape[0] == 0 or not np.any(segment_row >= 0):
            return
        rows, floats_d, ints_d = _upload(segment_row, np.asarray(floats, dtype=params.dtype),
                                         np.asarray(ints, dtype=np.int32))
        _kernel(device_id, segments_kernel_name(params.dtype))(
            (_tile_grid(tile_rows.shape[0], device_id),), (BLOCK,),
            (params, grads, exp_avg, exp_avg_sq, tile_rows, np.int64(tile_rows.shape[0]), rows, floats_d, ints_d),
        )


@functools.lru_cache(maxsize=64)
def _tensor_tiles(sizes: tuple[int, ...]) -> np.ndarray:
    table = tiles(np.zeros(len(sizes), dtype=np.int64), np.array(sizes, dtype=np.int64), TILE)
    table.flags.writeable = False
    return table


def radam_step_tensors(params: list[cupy.ndarray], grads: list[cupy.ndarray], exp_avg: list[cupy.ndarray],
                       exp_avg_sq: list[cupy.ndarray], tensor_row: np.ndarray, floats: np.ndarray,
                       ints: np.ndarray) -> None:
    """One launch over lists of separate tensors; tensor ``i`` uses row ``tensor_row[i]`` (< 0: skipped).

    The tensors (validated, C-contiguous, one dtype, one device) are reached through a table of
    their addresses; it, the tile table over their sizes and the host tables go to the device in
    one asynchronous copy per call. An empty list launches nothing.
    """
    if not params:
        return
    dtype = params[0].dtype
    device_id = _device_id(params[0])
    tensor_row = np.asarray(tensor_row, dtype=np.int32)
    tile_rows = _tensor_tiles(tuple(int(a.size) for a in params))
    if tile_rows.shape[0] == 0 or not np.any(tensor_row >= 0):
        return
    pointers = np.array([[a.data.ptr for a in quad] for quad in zip(params, grads, exp_avg, exp_avg_sq)],
                        dtype=np.uint64)
    with cupy.cuda.Device(device_id):
        pointers_d, tiles_d, rows, floats_d, ints_d = _upload(
            pointers, tile_rows, tensor_row, np.asarray(floats, dtype=dtype), np.asarray(ints, dtype=np.int32))
        _kernel(device_id, tensors_kernel_name(dtype))(
            (_tile_grid(tile_rows.shape[0], device_id),), (BLOCK,),
            (pointers_d, tiles_d, np.int64(tile_rows.shape[0]), rows, floats_d, ints_d),
        )


def flavour_arguments(flavour: Flavour) -> tuple[np.float64, np.int32, np.int32, np.int32]:
    """The capturable kernel's flavour arguments: ``threshold, inclusive, hold_below, eps_on_v_hat``."""
    return (np.float64(flavour.threshold), np.int32(flavour.inclusive),
            np.int32(flavour.below_threshold == "none"), np.int32(flavour.eps_on_v_hat))


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
                         maximize: bool, flavour: Flavour = PRESETS["torch"]) -> None:
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
    beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, flavour
        Validated hyperparameters, as for :func:`fastradam.scalars.step_scalars` (the
        flavour's threshold, comparison, below-threshold update and eps placement are
        applied on the device, as there).

    Raises
    ------
    TypeError
        ``step`` or ``lr`` has an unsupported dtype, or ``lr`` is neither a real number nor an array.
    ValueError
        ``step`` or ``lr`` is not 0-d, is on another device, or overlaps a written buffer.
    """
    flavour = resolve_flavour(flavour)
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
             np.int32(decoupled_weight_decay), np.int32(maximize), *flavour_arguments(flavour)),
        )
