"""The gradient pre-pass before an update: what gates it (found_inf, check_finite) and, for a clipped
step, the norm, torch's coefficient and the gradient factor, all left on the device.

One read-only kernel (``prepass_flat``, ``prepass_segments``, ``prepass_tensors`` of radam.cu) runs
before the update when it is asked for, and never more than one:

- ``check_finite`` alone: it sets a device flag (zeroed first by an async memset) that the update
  takes as its skip flag (:func:`_checked_skip`);
- a clipped step (:class:`fastradam.clipping.Clip`): it computes the norm of the active gradients
  into a fresh 0-d float64 device array, and the gradient factor ``inv_grad_scale * coefficient``
  and the skip flag (found_inf, or check_finite and a NaN/inf norm: the norm is the finite check)
  into a scratch kept per device and stream (:class:`NormScratch`); the update reads the factor
  through a pointer. Its grid is a function of the work alone (:func:`module.norm_grid`), so the
  norm has the same bits on every run. A given norm (``clip.norm``: a host float, copied to the
  device, or a 0-d device array) replaces the pass over the gradients by one thread that finishes
  from it.

The host never waits: the pair of launches (pre-pass, update) can be captured in a CUDA graph
(call once before capturing, so that the scratch is allocated outside the capture; a norm returned
inside a capture is written at every replay, so keep it as long as the graph).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import cupy
import numpy as np

from fastradam.backends.cuda import launch
from fastradam.backends.cuda.interop import _device_id
from fastradam.backends.cuda.launch import NO_FLAG, Value
from fastradam.backends.cuda.module import BLOCK, NORM_BLOCKS, Storage, _kernel, kernel_name
from fastradam.clipping import Clip
from fastradam.spec import DTYPE_CODES

_INT_FLAG = np.int32(DTYPE_CODES[np.dtype(np.int32)])


@dataclass(frozen=True)
class Gate:
    """What an update launch takes from its pre-pass: ``skip`` (the kernel's ``skip, skip_code``;
    None: launch no update), ``factor`` (the clipped step's device gradient factor; None: the tables'
    inv_grad_scale) and ``norm`` (a clipped step's 0-d float64 device norm, what the launch returns;
    None without clipping)."""

    skip: Value | None
    factor: cupy.ndarray | None = None
    norm: cupy.ndarray | None = None

    def without_update(self) -> Gate:
        """This gate with no update to launch (nothing active): the norm is still returned."""
        return replace(self, skip=None)


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


def _checked_skip(storage: Storage, device_id: int, skip: Value, kind: str, grid: int,
                  arguments: Callable[[Value, cupy.ndarray], tuple]) -> Value:
    """Run the check_finite pre-pass ``kind`` ("flat", "segments", "tensors"; found_inf folded in),
    its arguments ``arguments(skip, flag)`` (a ``launch.prepass_*`` without norm arguments); the
    update's new ``skip, skip_code``."""
    flag = _finite_flag(device_id)
    _kernel(device_id, storage, kernel_name(f"prepass_{kind}", storage))((grid,), (BLOCK,), arguments(skip, flag))
    return np.uint64(flag.data.ptr), _INT_FLAG


@dataclass(frozen=True)
class NormScratch:
    """The clipping pre-pass's device memory of one (device, stream), allocated once at its largest
    (the pre-pass's grid of :data:`NORM_BLOCKS` blocks of :data:`BLOCK` threads, T threads):
    ``partials`` (2 T float64: a partial per thread, then the levels of the reduction tree),
    ``counters`` (T uint32 arrival counters of the tree's nodes: zero, and left zero by every
    pre-pass), ``factor`` (0-d float64: the gradient factor the update reads) and ``flag`` (0-d
    int32: the update's skip flag, written whole by the pre-pass)."""

    partials: cupy.ndarray
    counters: cupy.ndarray
    factor: cupy.ndarray
    flag: cupy.ndarray


_norm_scratches: dict[tuple[int, int], NormScratch] = {}


def _norm_scratch(device_id: int) -> NormScratch:
    """The :class:`NormScratch` of the current stream on ``device_id`` (stream order keeps one step's
    from the next; a graph captured on the stream keeps reading the same memory)."""
    key = (device_id, cupy.cuda.get_current_stream().ptr)
    scratch = _norm_scratches.get(key)
    if scratch is None:
        threads = NORM_BLOCKS * BLOCK
        scratch = _norm_scratches[key] = NormScratch(
            cupy.empty(2 * threads, dtype=np.float64), cupy.zeros(threads, dtype=np.uint32),
            cupy.empty((), dtype=np.float64), cupy.empty((), dtype=np.int32))
    return scratch


def _given_norm(norm: Any, device_id: int) -> cupy.ndarray:
    """A given norm as the 0-d device array the pre-pass reads: a host float copied to the device
    (no synchronisation), or a checked 0-d array (:func:`device_args.check_norm`) on ``device_id``."""
    if not isinstance(norm, cupy.ndarray):
        return cupy.full((), float(norm), dtype=np.float64)
    if _device_id(norm) != device_id:
        raise ValueError(f"grad_norm is on CUDA device {_device_id(norm)} but params is on device {device_id}")
    return norm


def gate(storage: Storage, device_id: int, skip: Value | None, check_finite: bool, clip: Clip | None, kind: str,
         grid: int, norm_grid: int, arguments: Callable[..., tuple]) -> Gate:
    """Run what must come before an update, inside ``device_id``'s context: nothing, the check_finite
    pre-pass, or (``clip``) the clipping pre-pass; the update's :class:`Gate`.

    ``skip`` is the found_inf ``skip, skip_code`` (None: a set host flag, which only a clipped step
    reaches, for its norm), ``kind`` the pre-pass ("flat", "segments", "tensors"), launched on
    ``grid`` blocks for check_finite and ``norm_grid`` for a norm, with the arguments
    ``arguments(skip, flag, norm_arguments)`` (a ``launch.prepass_*`` with its buffers and tables).
    """
    if clip is None:
        return Gate(_checked_skip(storage, device_id, skip, kind, grid, arguments) if check_finite else skip)
    scratch = _norm_scratch(device_id)
    norm = cupy.empty((), dtype=np.float64)
    found_inf = NO_FLAG if skip is None else skip
    if clip.norm is None:
        request = launch.norm_request(clip, partials=scratch.partials, counters=scratch.counters, norm=norm,
                                      factor=scratch.factor, check_finite=check_finite)
        _kernel(device_id, storage, kernel_name(f"prepass_{kind}", storage))(
            (norm_grid,), (BLOCK,), arguments(found_inf, scratch.flag, request))
    else:
        request = launch.norm_request(clip, given=launch.given_norm(_given_norm(clip.norm, device_id)), norm=norm,
                                      factor=scratch.factor, check_finite=check_finite)
        _kernel(device_id, storage, kernel_name("prepass_flat", storage))(
            (1,), (1,), launch.prepass_flat(None, 0, found_inf, scratch.flag, request))
    if skip is None or clip.max_norm is None:
        return Gate(None, norm=norm)
    return Gate((np.uint64(scratch.flag.data.ptr), _INT_FLAG), scratch.factor, norm)


def norm_without_work(clip: Clip) -> cupy.ndarray:
    """The norm of a clipped launch with no buffers (an empty tensor list), on the current device:
    the given norm as a fresh 0-d float64 array, else 0."""
    if clip.norm is None:
        return cupy.zeros((), dtype=np.float64)
    return cupy.asarray(clip.norm, dtype=np.float64).copy()
