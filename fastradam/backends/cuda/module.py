"""Compile and naming: the storage combinations, the kernels' name expressions, the compiled modules.

The source (``kernels/radam.cu``) is compiled lazily on first use with NVRTC for the current
device's architecture and cached by CuPy (``~/.cupy/kernel_cache``): one ``RawModule`` per
storage combination (:class:`fastradam.storage.Storage`: params, grads, moments, and how the params
keep their values: the kernels' keeper, :func:`fastradam.abi_header.keeper_type`) holds its eight
kernels (six under stochastic rounding: no capturable ones), instantiated from the templates with
``name_expressions`` (43 combinations, 203 update kernels and 12 gradient pre-passes in all: the
check_finite and clipping-norm pass, templated on the grads' storage; see :data:`NAME_EXPRESSIONS`).

Notes
-----
- The kernels, templated on each role's storage, widen 16-bit formats to float32 with the CUDA
  intrinsics of ``cuda_bf16.h`` / ``cuda_fp16.h`` and round back to nearest even. Those
  headers come from the pip ``nvidia-cuda-runtime`` wheel (``nvidia/cu13/include``) or a CUDA
  toolkit, found by ``cuda-pathfinder`` (:func:`cuda_include_dir`).
- Compiled with ``--fmad=false``: no multiply-add contraction, so the GPU rounds like the oracle,
  the Numba backend and the CPU harness of the same source; the step is memory-bound, so
  contraction would buy no speed. CuPy itself appends ``-ftz=true``: float32 subnormals flush
  to zero on the GPU (float64 is unaffected).
- Grid: ``min(ceil(n / (block * lanes)), SMs * blocks_per_SM)`` blocks of 256 threads, each
  thread striding over packs of ``lanes`` elements per role (16 bytes of the narrowest role:
  4 floats, 2 doubles, 8 with any 16-bit role, whose float roles then move 32 bytes). The
  multi-tensor kernels cut the work into :data:`TILE`-element tiles (``fastradam.layout.tiles``)
  and launch ``min(tiles, SMs * blocks_per_SM)`` blocks, each taking tiles in turn.
- The clipping norm's pre-pass sizes its grid from the work alone (:func:`norm_grid`,
  :func:`norm_tile_grid`), never from the device: its sums are added in an order fixed by the grid,
  so the norm has the same bits on every run and every device.
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Any

import cupy
import numpy as np

from fastradam.abi_header import capturable, keeper_type
from fastradam.storage import FORMAT_OF_VIEW, FORMATS, REMAINDER_DTYPE, SUPPORTED, Storage

#: The kernel source, relative to the kernel folder (``fastradam.kernels`` when installed).
KERNEL_FILE = "radam.cu"
#: NVRTC options the backend compiles with (CuPy adds ``-arch`` and ``-ftz=true``).
COMPILE_OPTIONS = ("--std=c++17", "--fmad=false")

#: C++ storage type of each storage format (the kernels' template arguments P, G and Mo).
STORAGE_TYPES = {name: f.c_type for name, f in FORMATS.items()}

BLOCK = 256
BLOCKS_PER_SM = 8
#: The clipping norm's pre-pass: at most this many blocks (of :data:`BLOCK` threads), each thread
#: taking at least :data:`NORM_PACKS` 16-byte packs of the grads before the grid grows.
NORM_BLOCKS = 1024
NORM_PACKS = 4
#: Elements per tile of the multi-tensor kernels: a multiple of the 64-element layout alignment
#: (so tiles of an aligned layout stay 16-byte co-aligned) and of BLOCK * 8 lanes.
TILE = 4096
_PACK_BYTES = 16

#: The kernel templates of radam.cu by kind: the update kernels are templated on the whole
#: :class:`Storage`, the gradient pre-passes (``prepass_*``: check_finite, the clipping norm) on the
#: grads storage only.
UPDATE_KERNELS = {
    "step": "radam_step",  # host scalars by value
    "segments": "radam_step_segments",  # over the segments of flat buffers
    "tensors": "radam_step_tensors",  # over a list of separate tensors
    "capturable": "radam_step_capturable",  # step and lr read through type codes
    "segments_capturable": "radam_step_segments_capturable",  # step counts and lrs read on the device
}
PREPASS_KERNELS = ("prepass_flat", "prepass_segments", "prepass_tensors")
#: The update kernels whose step count is read on the device (none under stochastic rounding).
CAPTURABLE_KERNELS = ("capturable", "segments_capturable")
#: Every kind :func:`kernel_name` takes, in the order of :func:`name_expressions`.
KERNEL_KINDS = (*UPDATE_KERNELS, *PREPASS_KERNELS)


@functools.lru_cache(maxsize=None)
def lanes(storage: Storage) -> int:
    """Elements per 16-byte pack of the narrowest role of ``storage``."""
    return _PACK_BYTES // min(FORMATS[f].itemsize for f in (storage.params, storage.grads, storage.moments))


@functools.lru_cache(maxsize=None)
def grad_lanes(storage: Storage) -> int:
    """Gradient elements per 16-byte pack (the pre-passes read the grads alone)."""
    return _PACK_BYTES // FORMATS[storage.grads].itemsize


@functools.lru_cache(maxsize=None)
def template_arguments(storage: Storage) -> str:
    """The kernels' template arguments ``P, G, Mo, K`` for ``storage`` (K: its keeper)."""
    return (f"{STORAGE_TYPES[storage.params]}, {STORAGE_TYPES[storage.grads]}, {STORAGE_TYPES[storage.moments]}, "
            f"{keeper_type(storage)}")


#: Every storage combination the kernels are instantiated for (43): :data:`fastradam.storage.SUPPORTED`.
STORAGE_COMBINATIONS = SUPPORTED


def storage_of_arrays(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray, master: Any = None,
                      stochastic: bool = False) -> Storage:
    """The :class:`Storage` of validated kernel arrays (16-bit formats as their bit views): ``master``
    is the fp32 master or, int16, the remainders; ``stochastic`` rounds bfloat16 params stochastically."""
    return _storage_of_dtypes(params.dtype, grads.dtype, exp_avg.dtype, None if master is None else master.dtype,
                              stochastic)


@functools.lru_cache(maxsize=None)
def _storage_of_dtypes(params: np.dtype, grads: np.dtype, moments: np.dtype, master: np.dtype | None,
                       stochastic: bool) -> Storage:
    remainders = master == REMAINDER_DTYPE
    storage = Storage(FORMAT_OF_VIEW[params], FORMAT_OF_VIEW[grads], FORMAT_OF_VIEW[moments],
                      master is not None and not remainders, remainders, stochastic)
    if storage not in SUPPORTED:
        raise TypeError(f"the CUDA kernels have no instantiation for {storage} (see fastradam.storage.SUPPORTED)")
    return storage


def check_capturable(stochastic: bool) -> None:
    """ValueError for stochastic rounding: the capturable kernels fold their scalars on the device,
    and its key is hashed from the step on the host."""
    if stochastic:
        raise ValueError("stochastic rounding has no capturable kernels (its key is hashed from the step on the "
                         "host): step with a host step number, or round to nearest")


@functools.lru_cache(maxsize=None)
def kernel_name(kind: str, storage: Storage) -> str:
    """Name expression of the kernel ``kind`` (one of :data:`KERNEL_KINDS`) for ``storage``, in
    CuPy's style: ``fastradam::radam_step_segments<float, float, float, fastradam::RoundNearest>``; a gradient
    pre-pass (``prepass_flat``, ``prepass_segments``, ``prepass_tensors``) is templated on
    ``storage.grads`` only."""
    if kind in UPDATE_KERNELS:
        return f"fastradam::{UPDATE_KERNELS[kind]}<{template_arguments(storage)}>"
    if kind in PREPASS_KERNELS:
        return f"fastradam::{kind}<{STORAGE_TYPES[storage.grads]}>"
    raise ValueError(f"unknown kernel kind {kind!r}; expected one of {', '.join(KERNEL_KINDS)}")


def name_expressions(storage: Storage) -> tuple[str, ...]:
    """The instantiations one storage combination launches (compiled together, on first use): every
    kind, but no capturable one under stochastic rounding."""
    return tuple(kernel_name(kind, storage) for kind in KERNEL_KINDS
                 if capturable(storage) or kind not in CAPTURABLE_KERNELS)


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
    package = Path(__file__).resolve().parents[2]  # fastradam/ (this file: fastradam/backends/cuda/module.py)
    installed = package / "kernels"
    return installed if (installed / KERNEL_FILE).is_file() else package.parent / "kernels"


def kernel_source() -> str:
    """The text of ``radam.cu``, tagged with a hash of the headers (the generated ABI header too) so
    CuPy's cache sees them change."""
    folder = kernel_dir()
    headers = hashlib.sha256()
    for header in sorted(folder.rglob("*.cuh")):
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


def norm_grid(n: int, grad_lanes: int) -> int:
    """Blocks of the clipping norm's pre-pass over ``n`` flat gradient elements (``grad_lanes`` per
    16-byte pack): ``min(ceil(n / (BLOCK * grad_lanes * NORM_PACKS)), NORM_BLOCKS)``, at least 1. A
    function of the work alone, never of the device: the order of the norm's sums follows it."""
    return max(1, min(math.ceil(n / (BLOCK * grad_lanes * NORM_PACKS)), NORM_BLOCKS))


def norm_tile_grid(n_tiles: int) -> int:
    """Blocks of the clipping norm's pre-pass over ``n_tiles`` tiles (layouts, tensor lists):
    ``min(n_tiles, NORM_BLOCKS)``, at least 1, whichever tiles are active."""
    return max(1, min(n_tiles, NORM_BLOCKS))
