"""CUDA backend: the templated kernels of ``kernels/radam.cu``, compiled by CuPy, run on its current stream.

The source is compiled lazily on first use with NVRTC for the current device's architecture
and cached by CuPy (``~/.cupy/kernel_cache``): one ``RawModule`` per storage combination
(:class:`Storage`: params, grads, moments, master) holds its eight kernels, instantiated from
the templates with ``name_expressions`` (31 combinations, 155 update kernels and 12
check_finite pre-passes in all; see :data:`NAME_EXPRESSIONS`).

Storage: float32/float64 arrays are used as they are; bfloat16 and float16 reach the kernels as
bit views (``uint16``: bfloat16 bits, ``int16``: float16 bits, as in the Numba backend), and
the kernels, templated on each role's storage, widen them to float32 with the CUDA intrinsics
of ``cuda_bf16.h`` / ``cuda_fp16.h`` and round back to nearest even. Those headers come from
the pip ``nvidia-cuda-runtime`` wheel (``nvidia/cu13/include``) or a CUDA toolkit, found by
``cuda-pathfinder`` (:func:`cuda_include_dir`). CuPy has no bfloat16 dtype, so bfloat16 buffers
are torch CUDA tensors, viewed zero-copy from their addresses as bits (:func:`as_arrays`).

Notes
-----
- Launches are asynchronous on CuPy's current stream of the buffers' device
  (``cupy.cuda.get_current_stream()``); nothing synchronises the host. With torch tensors, that
  stream is first ordered after torch's current stream on their device (an event, only when
  the two differ), as a DLPack export would; torch callers who want the step on torch's stream
  itself wrap the call in ``cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)``.
- Compiled with ``--fmad=false``: no multiply-add contraction, so the GPU rounds like the oracle,
  the Numba backend and the CPU harness of the same source; the step is memory-bound, so
  contraction would buy no speed. CuPy itself appends ``-ftz=true``: float32 subnormals flush
  to zero on the GPU (float64 is unaffected).
- Grid: ``min(ceil(n / (block * lanes)), SMs * blocks_per_SM)`` blocks of 256 threads, each
  thread striding over packs of ``lanes`` elements per role (16 bytes of the narrowest role:
  4 floats, 2 doubles, 8 with any 16-bit role, whose float roles then move 32 bytes).
- found_inf (a 0-d device array) is read by the kernels themselves; ``check_finite`` runs a
  read-only pre-pass that sets a device flag the update kernel reads: no host synchronisation. The multi-tensor
  kernels cut the work into :data:`TILE`-element tiles (``fastradam.layout.tiles``) and launch
  ``min(tiles, SMs * blocks_per_SM)`` blocks, each taking tiles in turn.
- Tables: a flat step passes its one row of scalars by value (no copy). A layout's tile table
  goes to the device once per device (cached in ``SegmentArrays.derived["cuda"]``); the small
  per-call tables (rows, scalars, a tensor list's pointers and tiles) go in one asynchronous
  host-to-device copy on the current stream, into memory from CuPy's pool (which reuses a
  block only on the stream it was freed on, so a later call cannot overwrite a table that a
  queued launch still reads). The capturable segments launch keeps its tables resident
  instead (:func:`_resident`), so a CUDA graph captured after a first call uploads nothing.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import cupy
import numpy as np

from fastradam.backends import backend_for
from fastradam.flavours import PRESETS, Flavour, resolve_flavour
from fastradam.layout import SegmentArrays, tiles
from fastradam.validation import check_storage

#: The kernel source, relative to the kernel folder (``fastradam.kernels`` when installed).
KERNEL_FILE = "radam.cu"
#: NVRTC options the backend compiles with (CuPy adds ``-arch`` and ``-ftz=true``).
COMPILE_OPTIONS = ("--std=c++17", "--fmad=false")

#: C++ storage type of each storage format (the kernels' template arguments P, G and Mo).
STORAGE_TYPES = {
    "float32": "float",
    "float64": "double",
    "bfloat16": "fastradam::bfloat16_t",
    "float16": "fastradam::float16_t",
}
#: The bit-view dtype each 16-bit storage format reaches the kernels as (as in the Numba
#: backend): the view's dtype tells which format the bits hold.
BIT_VIEWS = {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.int16)}
#: The storage format of each array dtype the kernels take (16-bit formats: their bit views).
VIEW_STORAGE = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64",
                **{view: name for name, view in BIT_VIEWS.items()}}
#: Type codes of the 0-d device values the kernels read (radam.cu: kInt8 ... kFloat64); 0: none.
VALUE_CODES = {
    np.dtype(np.bool_): 1, np.dtype(np.int8): 1, np.dtype(np.uint8): 1,
    np.dtype(np.int32): 2, np.dtype(np.uint32): 2, np.dtype(np.int64): 3, np.dtype(np.uint64): 3,
    np.dtype(np.float32): 4, np.dtype(np.float64): 5,
}
#: dtypes a device-side step count may have.
STEP_DTYPES = (np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.float64))
#: dtypes a device-side learning rate may have.
LR_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

BLOCK = 256
BLOCKS_PER_SM = 8
#: Elements per tile of the multi-tensor kernels: a multiple of the 64-element layout alignment
#: (so tiles of an aligned layout stay 16-byte co-aligned) and of BLOCK * 8 lanes.
TILE = 4096
_PACK_BYTES = 16
#: Byte alignment of each table inside the one per-call upload.
_TABLE_ALIGN = 16


@dataclass(frozen=True)
class Storage:
    """The storage of one step: params, grads and moments formats, and whether an fp32 master is there."""

    params: str
    grads: str
    moments: str
    master: bool = False

    @functools.cached_property
    def math_dtype(self) -> np.dtype:
        """float64 only when everything is float64; float32 otherwise."""
        return np.dtype(np.float64 if self.params == "float64" else np.float32)

    @functools.cached_property
    def lanes(self) -> int:
        """Elements per 16-byte pack of the narrowest role."""
        return _PACK_BYTES // min(np.dtype(_NUMPY_OF[f]).itemsize for f in (self.params, self.grads, self.moments))

    def template_arguments(self) -> str:
        return (f"{STORAGE_TYPES[self.params]}, {STORAGE_TYPES[self.grads]}, {STORAGE_TYPES[self.moments]}, "
                f"{'true' if self.master else 'false'}")


_NUMPY_OF = {"float32": np.float32, "float64": np.float64, "bfloat16": np.uint16, "float16": np.int16}


def _supported_storage() -> tuple[Storage, ...]:
    """Every combination :func:`fastradam.validation.check_storage` accepts."""
    found = []
    for params, grads, moments, master in itertools.product(STORAGE_TYPES, STORAGE_TYPES, STORAGE_TYPES,
                                                            (False, True)):
        try:
            check_storage((params, grads, moments, moments), master="float32" if master else None)
        except TypeError:
            continue
        found.append(Storage(params, grads, moments, master))
    return tuple(found)


#: Every storage combination the kernels are instantiated for (31).
STORAGE_COMBINATIONS = _supported_storage()


def storage_of_arrays(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray,
                      master: Any = None) -> Storage:
    """The :class:`Storage` of validated kernel arrays (16-bit formats as their bit views)."""
    return _storage_of_dtypes(params.dtype, grads.dtype, exp_avg.dtype, master is not None)


@functools.lru_cache(maxsize=None)
def _storage_of_dtypes(params: np.dtype, grads: np.dtype, moments: np.dtype, master: bool) -> Storage:
    return Storage(VIEW_STORAGE[params], VIEW_STORAGE[grads], VIEW_STORAGE[moments], master)


@functools.lru_cache(maxsize=None)
def step_kernel_name(storage: Storage) -> str:
    """Name expression of the kernel that takes host scalars."""
    return f"fastradam::radam_step<{storage.template_arguments()}>"


@functools.lru_cache(maxsize=None)
def segments_kernel_name(storage: Storage) -> str:
    """Name expression of the kernel over the segments of flat buffers."""
    return f"fastradam::radam_step_segments<{storage.template_arguments()}>"


@functools.lru_cache(maxsize=None)
def tensors_kernel_name(storage: Storage) -> str:
    """Name expression of the kernel over a list of separate tensors."""
    return f"fastradam::radam_step_tensors<{storage.template_arguments()}>"


@functools.lru_cache(maxsize=None)
def segments_capturable_kernel_name(storage: Storage) -> str:
    """Name expression of the capturable kernel over segments (step counts and lrs read on the device)."""
    return f"fastradam::radam_step_segments_capturable<{storage.template_arguments()}>"


@functools.lru_cache(maxsize=None)
def capturable_kernel_name(storage: Storage) -> str:
    """Name expression of the capturable kernel (step and lr read through type codes)."""
    return f"fastradam::radam_step_capturable<{storage.template_arguments()}>"


@functools.lru_cache(maxsize=None)
def finite_kernel_name(kind: str, grads: str) -> str:
    """Name expression of the check_finite pre-pass ``kind`` ("flat", "segments", "tensors") over ``grads``."""
    return f"fastradam::nonfinite_{kind}<{STORAGE_TYPES[grads]}>"


FINITE_KINDS = ("flat", "segments", "tensors")


def name_expressions(storage: Storage) -> tuple[str, ...]:
    """The instantiations one storage combination launches (compiled together, on first use)."""
    return (step_kernel_name(storage), segments_kernel_name(storage), tensors_kernel_name(storage),
            capturable_kernel_name(storage), segments_capturable_kernel_name(storage),
            *(finite_kernel_name(k, storage.grads) for k in FINITE_KINDS))


#: Every template instantiation the backend can launch.
NAME_EXPRESSIONS = tuple(dict.fromkeys(name for storage in STORAGE_COMBINATIONS for name in name_expressions(storage)))


def cuda_include_dir() -> str | None:
    """The folder holding ``cuda_bf16.h`` and ``cuda_fp16.h``: the pip ``nvidia-cuda-runtime``
    wheel (``nvidia/cu13/include``) or a CUDA toolkit, as ``cuda-pathfinder`` finds them."""
    from cuda.pathfinder import find_nvidia_header_directory

    found = find_nvidia_header_directory("cudart")
    return found if found and (Path(found) / "cuda_bf16.h").is_file() else None


def compile_options() -> tuple[str, ...]:
    """NVRTC options besides ``-arch`` (CuPy adds that and ``-ftz=true``)."""
    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("the CUDA kernels include cuda_bf16.h and cuda_fp16.h, which were not found: "
                           "pip install nvidia-cuda-runtime (or install a CUDA toolkit)")
    return COMPILE_OPTIONS + (f"-I{kernel_dir()}", f"-I{include}")


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
def _module(device_id: int, storage: Storage) -> cupy.RawModule:
    """The kernels of one storage combination, compiled on first use (and cached on disk by CuPy)."""
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=kernel_source(), options=compile_options(),
                              name_expressions=name_expressions(storage))


@functools.lru_cache(maxsize=None)
def _kernel(device_id: int, storage: Storage, name: str) -> cupy.RawKernel:
    with cupy.cuda.Device(device_id):
        return _module(device_id, storage).get_function(name)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _grid(n: int, lanes: int, device_id: int) -> int:
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


def as_arrays(objects: Sequence[Any]) -> list[cupy.ndarray]:
    """``objects`` as the CuPy arrays the kernels take, sharing their memory (no copy).

    CuPy arrays are themselves (float16 ones viewed as bits). A torch CUDA tensor is viewed from
    its address, as its dtype or, for bfloat16/float16, as bits (CuPy has no bfloat16 and
    DLPack cannot carry it): ``uint16`` holds bfloat16 bits, ``int16`` float16 bits; then CuPy's
    current stream is ordered once after torch's (as DLPack's per-tensor handshake would).
    Other objects (a tensor that is not dense and contiguous, JAX arrays, Numba device arrays)
    cross through DLPack or ``__cuda_array_interface__``.
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
        elif hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
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


def _pointer(array: cupy.ndarray | None) -> np.uint64:
    """A pointer argument (null for None)."""
    return np.uint64(0 if array is None else array.data.ptr)


def _flag_arguments(found_inf: Any, device_id: int) -> tuple[np.uint64, np.int32] | None:
    """The kernels' ``skip, skip_code`` for ``found_inf``; None when a host flag says skip."""
    if isinstance(found_inf, (bool, np.bool_)) or found_inf is None:
        return None if found_inf else (np.uint64(0), np.int32(0))
    if found_inf.dtype not in VALUE_CODES:
        allowed = ", ".join(sorted({d.name for d in VALUE_CODES}))
        raise TypeError(f"found_inf must have dtype {allowed}, got {found_inf.dtype}")
    if _device_id(found_inf) != device_id:
        raise ValueError(f"found_inf is on CUDA device {_device_id(found_inf)} but params is on device {device_id}")
    return np.uint64(found_inf.data.ptr), np.int32(VALUE_CODES[found_inf.dtype])


_finite_flags: dict[tuple[int, int], cupy.ndarray] = {}


def _finite_flag(device_id: int) -> cupy.ndarray:
    """A device int for the check_finite pre-pass, zeroed by an async memset on the current stream.

    One per (device, stream), kept: stream order keeps one step's flag from the next, and a graph
    captured on the stream replays the memset, the pre-pass and the update on the same memory
    (so call once before capturing, to allocate it outside the capture).
    """
    stream = cupy.cuda.get_current_stream()
    key = (device_id, stream.ptr)
    flag = _finite_flags.get(key)
    if flag is None:
        flag = _finite_flags[key] = cupy.empty((), dtype=np.int32)
    cupy.cuda.runtime.memsetAsync(flag.data.ptr, 0, flag.nbytes, stream.ptr)
    return flag


def _checked_skip(storage: Storage, device_id: int, skip: tuple, kind: str, grid: int,
                  arguments: tuple) -> tuple[np.uint64, np.int32]:
    """Run the check_finite pre-pass ``kind`` (found_inf folded in); the update's new ``skip, skip_code``."""
    flag = _finite_flag(device_id)
    _kernel(device_id, storage, finite_kernel_name(kind, storage.grads))(
        (grid,), (BLOCK,), (*arguments, *skip, flag))
    return np.uint64(flag.data.ptr), np.int32(VALUE_CODES[np.dtype(np.int32)])


def radam_step(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray, exp_avg_sq: cupy.ndarray,
               floats: np.ndarray, ints: np.ndarray, *, master: cupy.ndarray | None = None,
               found_inf: Any = False, check_finite: bool = False) -> None:
    """Launch one RAdam step, in place, on validated C-contiguous CuPy buffers (16-bit: bit views).

    ``floats`` (1, 8) in the math dtype and ``ints`` (1, 2) int32 are the host tables of
    :func:`fastradam.scalars.pack_rows`; row 0 is passed by value, as NumPy scalars of exactly
    the kernel's parameter types (CuPy would pass a Python float as a double unchecked).
    ``master`` is the fp32 master beside 16-bit params. ``found_inf`` is a host bool (True:
    nothing is launched) or a 0-d device array the kernel reads; ``check_finite`` adds a
    read-only pre-pass over ``grads``. Asynchronous on CuPy's current stream; no host sync.
    """
    n = params.size
    device_id = _device_id(params)
    skip = _flag_arguments(found_inf, device_id)
    if n == 0 or skip is None:
        return
    storage = storage_of_arrays(params, grads, exp_avg, master)
    row = (*np.asarray(floats, dtype=storage.math_dtype)[0], *np.asarray(ints, dtype=np.int32)[0])
    grid = _grid(n, storage.lanes, device_id)
    with cupy.cuda.Device(device_id):
        if check_finite:
            skip = _checked_skip(storage, device_id, skip, "flat", grid, (grads, np.int64(n)))
        _kernel(device_id, storage, step_kernel_name(storage))(
            (grid,), (BLOCK,),
            (params, grads, exp_avg, exp_avg_sq, _pointer(master), np.int64(n), *row, *skip),
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


def _segments_prologue(storage: Storage, device_id: int, segments: SegmentArrays, segment_rows: np.ndarray,
                       upload: Callable[..., list[cupy.ndarray]], grads: cupy.ndarray, skip: tuple,
                       check_finite: bool, *tables: np.ndarray) -> tuple | None:
    """What a launch over segments needs, inside its device's context: the device tile table, its
    length, the grid, the device copies of ``segment_rows`` and ``tables`` (by ``upload``) and
    the skip flag (the check_finite pre-pass's, if asked); None when no segment is active."""
    tile_rows = _layout_tiles(segments, device_id)
    if tile_rows.shape[0] == 0 or not np.any(segment_rows >= 0):
        return None
    device_tables = upload(segment_rows, *tables)
    n_tiles = np.int64(tile_rows.shape[0])
    grid = _tile_grid(tile_rows.shape[0], device_id)
    if check_finite:
        skip = _checked_skip(storage, device_id, skip, "segments", grid, (grads, tile_rows, n_tiles, device_tables[0]))
    return tile_rows, n_tiles, grid, device_tables, skip


def radam_step_segments(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray,
                        exp_avg_sq: cupy.ndarray, segments: SegmentArrays, segment_row: np.ndarray,
                        floats: np.ndarray, ints: np.ndarray, *, master: cupy.ndarray | None = None,
                        found_inf: Any = False, check_finite: bool = False) -> None:
    """One launch over the segments of flat buffers; segment ``i`` uses row ``segment_row[i]`` (< 0: skipped).

    ``segment_row`` (int32, one per segment), ``floats`` (R, 8, the math dtype) and ``ints``
    (R, 2, int32) are host arrays, uploaded in one asynchronous copy; the layout's tile table is
    uploaded once per device. Skipped segments and the padding are neither read nor written
    (nor read by the check_finite pre-pass). ``master``, ``found_inf``, ``check_finite``: as in
    :func:`radam_step`.
    """
    device_id = _device_id(params)
    skip = _flag_arguments(found_inf, device_id)
    segment_row = np.asarray(segment_row, dtype=np.int32)
    if skip is None:
        return
    storage = storage_of_arrays(params, grads, exp_avg, master)
    with cupy.cuda.Device(device_id):
        prologue = _segments_prologue(storage, device_id, segments, segment_row, _upload, grads, skip, check_finite,
                                      np.asarray(floats, dtype=storage.math_dtype), np.asarray(ints, dtype=np.int32))
        if prologue is None:
            return
        tile_rows, n_tiles, grid, (rows, floats_d, ints_d), skip = prologue
        _kernel(device_id, storage, segments_kernel_name(storage))(
            (grid,), (BLOCK,),
            (params, grads, exp_avg, exp_avg_sq, _pointer(master), tile_rows, n_tiles, rows, floats_d, ints_d,
             *skip),
        )


@functools.lru_cache(maxsize=64)
def _tensor_tiles(sizes: tuple[int, ...]) -> np.ndarray:
    table = tiles(np.zeros(len(sizes), dtype=np.int64), np.array(sizes, dtype=np.int64), TILE)
    table.flags.writeable = False
    return table


def radam_step_tensors(params: list[cupy.ndarray], grads: list[cupy.ndarray], exp_avg: list[cupy.ndarray],
                       exp_avg_sq: list[cupy.ndarray], tensor_row: np.ndarray, floats: np.ndarray,
                       ints: np.ndarray, *, master: list[cupy.ndarray] | None = None, found_inf: Any = False,
                       check_finite: bool = False) -> None:
    """One launch over lists of separate tensors; tensor ``i`` uses row ``tensor_row[i]`` (< 0: skipped).

    The tensors (validated, C-contiguous, one storage per role, one device) are reached through a
    table of their addresses (params, grads, exp_avg, exp_avg_sq and, with ``master``, the fp32
    master); it, the tile table over their sizes and the host tables go to the device in one
    asynchronous copy per call. An empty list launches nothing. ``found_inf``, ``check_finite``:
    as in :func:`radam_step`.
    """
    if not params:
        return
    device_id = _device_id(params[0])
    skip = _flag_arguments(found_inf, device_id)
    tensor_row = np.asarray(tensor_row, dtype=np.int32)
    tile_rows = _tensor_tiles(tuple(int(a.size) for a in params))
    if skip is None or tile_rows.shape[0] == 0 or not np.any(tensor_row >= 0):
        return
    storage = storage_of_arrays(params[0], grads[0], exp_avg[0], None if master is None else master[0])
    roles = (params, grads, exp_avg, exp_avg_sq) + (() if master is None else (master,))
    pointers = np.array([[a.data.ptr for a in tensor] for tensor in zip(*roles)], dtype=np.uint64)
    with cupy.cuda.Device(device_id):
        pointers_d, tiles_d, rows, floats_d, ints_d = _upload(
            pointers, tile_rows, tensor_row, np.asarray(floats, dtype=storage.math_dtype),
            np.asarray(ints, dtype=np.int32))
        n_tiles = np.int64(tile_rows.shape[0])
        grid = _tile_grid(tile_rows.shape[0], device_id)
        if check_finite:
            skip = _checked_skip(storage, device_id, skip, "tensors", grid,
                                 (pointers_d, np.int64(len(roles)), tiles_d, n_tiles, rows))
        _kernel(device_id, storage, tensors_kernel_name(storage))(
            (grid,), (BLOCK,), (pointers_d, tiles_d, n_tiles, rows, floats_d, ints_d, *skip),
        )


def flavour_arguments(flavour: Flavour) -> tuple[np.float64, np.int32, np.int32, np.int32]:
    """The capturable kernel's flavour arguments: ``threshold, inclusive, hold_below, eps_on_v_hat``."""
    return (np.float64(flavour.threshold), np.int32(flavour.inclusive),
            np.int32(flavour.below_threshold == "none"), np.int32(flavour.eps_on_v_hat))


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


def radam_step_on_device(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray,
                         exp_avg_sq: cupy.ndarray, step: Any, lr: Any, *, beta1: float, beta2: float,
                         eps: float, weight_decay: float, decoupled_weight_decay: bool,
                         maximize: bool, flavour: Flavour = PRESETS["torch"], master: cupy.ndarray | None = None,
                         grad_scale: float = 1.0, found_inf: Any = False, check_finite: bool = False) -> None:
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
    master, grad_scale, found_inf, check_finite
        As for :func:`radam_step` (``grad_scale`` validated: the kernel multiplies the gradient
        by ``1 / grad_scale``, rounded to the math dtype as the host tables round it). A device
        ``found_inf`` skips the step on the device, so a graph replays it correctly; the step
        count is the caller's to not advance.

    Raises
    ------
    TypeError
        ``step`` or ``lr`` has an unsupported dtype, or ``lr`` is neither a real number nor an array.
    ValueError
        ``step`` or ``lr`` is not 0-d, is on another device, or overlaps a written buffer.
    """
    flavour = resolve_flavour(flavour)
    written = (params, grads, exp_avg, exp_avg_sq) + (() if master is None else (master,))
    step_array = _device_scalar("step", step, STEP_DTYPES, written)
    lr_ref = _lr_reference("lr", lr, written)
    if isinstance(lr_ref, tuple):
        lr_arguments = (np.uint64(lr_ref[0]), np.int32(lr_ref[1]), np.float64(0.0))
    else:
        lr_arguments = (np.uint64(0), np.int32(0), np.float64(lr_ref))
    n = params.size
    device_id = _device_id(params)
    skip = _flag_arguments(found_inf, device_id)
    if n == 0 or skip is None:
        return
    storage = storage_of_arrays(params, grads, exp_avg, master)
    grid = _grid(n, storage.lanes, device_id)
    with cupy.cuda.Device(device_id):
        if check_finite:
            skip = _checked_skip(storage, device_id, skip, "flat", grid, (grads, np.int64(n)))
        _kernel(device_id, storage, capturable_kernel_name(storage))(
            (grid,), (BLOCK,),
            (params, grads, exp_avg, exp_avg_sq, _pointer(master), np.int64(n), step_array,
             np.int32(VALUE_CODES[step_array.dtype]), *lr_arguments,
             np.float64(beta1), np.float64(beta2), np.float64(eps), np.float64(weight_decay),
             np.int32(decoupled_weight_decay), np.int32(maximize), *flavour_arguments(flavour),
             np.float64(1.0 / grad_scale), *skip),
        )


def capturable_group_tables(groups: Sequence[Any], lrs: Sequence[float | tuple[int, int]],
                            grad_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The group tables of ``radam_step_segments_capturable``: one row per group.

    ``groups`` are validated :class:`~fastradam.validation.GroupHyperparameters`; ``lrs[k]`` is
    group ``k``'s learning rate, a real number or ``(address, type code)`` of a 0-d
    float32/float64 value the kernel reads. Returns floats (R, 7) float64: lr, beta1, beta2, eps,
    weight_decay, the flavour's threshold, 1/grad_scale; ints (R, 6) int32: decoupled,
    maximize, inclusive, hold_below, eps_on_v_hat, the lr's type code (0: the float); and the
    lr addresses (R,) uint64 (0 for a float).
    """
    floats = np.zeros((len(groups), 7), dtype=np.float64)
    ints = np.zeros((len(groups), 6), dtype=np.int32)
    pointers = np.zeros(len(groups), dtype=np.uint64)
    for row, (group, lr) in enumerate(zip(groups, lrs)):
        if isinstance(lr, tuple):
            pointers[row], ints[row, 5] = lr
            lr = 0.0
        threshold, inclusive, hold_below, eps_on_v_hat = flavour_arguments(group.flavour)
        floats[row] = (lr, group.beta1, group.beta2, group.eps, group.weight_decay, threshold, 1.0 / grad_scale)
        ints[row, :5] = (group.decoupled_weight_decay, group.maximize, inclusive, hold_below, eps_on_v_hat)
    return floats, ints, pointers


def capturable_lrs(lrs: Sequence[Any], segment_group: np.ndarray,
                   written: Sequence[cupy.ndarray]) -> list[float | tuple[int, int]]:
    """Each group's learning rate as :func:`capturable_group_tables` takes it: a real number as a
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


def _resident(segments: SegmentArrays, device_id: int, *tables: np.ndarray) -> list[cupy.ndarray]:
    """Device copies of small tables, kept per layout and device while their content is unchanged.

    A call repeated with the same tables uploads nothing, so a step captured in a CUDA graph
    after one call outside it (as torch asks of capturable optimizers) issues no host-to-device
    copy inside the capture. The last few distinct contents are kept, and those used during a
    capture for good: a graph keeps reading their addresses at every replay.
    """
    packed, offsets = pack_tables(*tables)
    cache = segments.derived.setdefault("cuda", {}).setdefault(("resident", device_id), {})
    key = packed.tobytes()
    stream = cupy.cuda.get_current_stream()
    entry = cache.pop(key, None)
    if entry is None:
        device = cupy.empty(packed.size, dtype=np.uint8)
        device.set(packed, stream=stream)
        entry = ([device[start:start + table.nbytes].view(table.dtype) for table, start in zip(tables, offsets)],
                 False)
        evictable = [k for k, (_, pinned) in cache.items() if not pinned]
        for old in evictable[:max(0, len(evictable) + 1 - _RESIDENT_TABLES)]:
            del cache[old]
    views, pinned = entry
    cache[key] = (views, pinned or _capturing(stream))  # most recently used last
    return views


def _capturing(stream: cupy.cuda.Stream) -> bool:
    try:
        return stream.is_capturing()
    except cupy.cuda.runtime.CUDARuntimeError:  # the query itself is refused during some captures
        return True


#: Distinct table contents :func:`_resident` keeps per layout and device (besides the pinned ones).
_RESIDENT_TABLES = 8


def radam_step_segments_on_device(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray,
                                  exp_avg_sq: cupy.ndarray, segments: SegmentArrays, segment_group: np.ndarray,
                                  steps: Any, groups: Sequence[Any], lrs: Sequence[Any], *,
                                  master: cupy.ndarray | None = None, grad_scale: float = 1.0,
                                  found_inf: Any = False, check_finite: bool = False) -> None:
    """One capturable launch over the segments of flat buffers, step counts read on the device.

    Segment ``i`` is stepped with the hyperparameters of ``groups[segment_group[i]]`` (host
    int32, < 0: skipped) and the step count ``steps[i]``, a 1-D int32/int64/float32/float64
    device array of one entry per segment (torch's capturable ``state["step"]`` values after
    their increment, e.g. a view of one flat tensor): the kernel folds the scalars itself, as
    :func:`radam_step_on_device` does, so the launch can be captured in a CUDA graph and
    replayed while the counts advance on the device. ``lrs[k]`` is group ``k``'s learning rate:
    a real number or a 0-d device array read by the kernel (see :func:`capturable_group_tables`).
    The small tables go to the device once and are reused while they are unchanged
    (:func:`_resident`): make one call before capturing. ``master``, ``grad_scale``,
    ``found_inf``, ``check_finite``: as in :func:`radam_step`. Nothing synchronises the host.
    """
    device_id = _device_id(params)
    skip = _flag_arguments(found_inf, device_id)
    if skip is None:
        return
    written = (params, grads, exp_avg, exp_avg_sq) + (() if master is None else (master,))
    steps_array = _device_scalar("steps", steps, STEP_DTYPES, written, shape=(len(segments.sizes),))
    if len(lrs) != len(groups):
        raise ValueError(f"lrs has {len(lrs)} entries but there are {len(groups)} groups")
    segment_group = np.asarray(segment_group, dtype=np.int32)
    if segment_group.shape != (len(segments.sizes),) or segment_group.max(initial=-1) >= len(groups):
        raise ValueError(f"segment_group must hold one group index (or -1) per segment ({len(segments.sizes)}), "
                         f"each < {len(groups)}")
    floats, ints, pointers = capturable_group_tables(groups, capturable_lrs(lrs, segment_group, written), grad_scale)
    storage = storage_of_arrays(params, grads, exp_avg, master)
    with cupy.cuda.Device(device_id):
        prologue = _segments_prologue(storage, device_id, segments, segment_group,
                                      functools.partial(_resident, segments, device_id), grads, skip, check_finite,
                                      floats, ints, pointers)
        if prologue is None:
            return
        tile_rows, n_tiles, grid, (rows, floats_d, ints_d, pointers_d), skip = prologue
        _kernel(device_id, storage, segments_capturable_kernel_name(storage))(
            (grid,), (BLOCK,),
            (params, grads, exp_avg, exp_avg_sq, _pointer(master), tile_rows, n_tiles, rows, steps_array,
             np.int32(VALUE_CODES[steps_array.dtype]), floats_d, ints_d, pointers_d, *skip),
        )
