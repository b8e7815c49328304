"""CUDA backend: the templated kernels of ``kernels/radam.cu``, compiled by CuPy, run on its current stream.

This package's face: the five launches (:func:`radam_step`, :func:`radam_step_segments`,
:func:`radam_step_tensors`, and the capturable :func:`radam_step_capturable` and
:func:`radam_step_segments_capturable`), each taking validated buffers as the arrays the kernels
take, the launchers a :class:`~fastradam.plan.StepPlan` binds (``bind_flat``, ``bind_segments``,
``bind_tensors``), and the names the registry (:mod:`fastradam.backends`) and callers use,
re-exported from the rooms behind it:

- :mod:`~fastradam.backends.cuda.interop`: adopting CuPy arrays, torch tensors and DLPack
  objects zero-copy (16-bit floats as bit views), torch's stream order, refusing immutable arrays;
- :mod:`~fastradam.backends.cuda.module`: storage combinations, kernel names, compilation, grids;
- :mod:`~fastradam.backends.cuda.launch`: every kernel's argument list (also the CPU harness's);
- :mod:`~fastradam.backends.cuda.tables`: tile and per-call tables and their uploads;
- :mod:`~fastradam.backends.cuda.device_args`: found_inf, a given clipping norm (:func:`check_norm`)
  and the capturable kernels' device-side step counts and learning rates;
- :mod:`~fastradam.backends.cuda.prepass`: the read-only gradient pre-pass that gates an update:
  check_finite, or the clipping norm (:mod:`fastradam.clipping`).

Launches are asynchronous on CuPy's current stream of the buffers' device
(``cupy.cuda.get_current_stream()``); nothing synchronises the host. Every launch takes ``clip``
(a :class:`~fastradam.clipping.Clip`, or None): then it returns the norm of the unscaled active
gradients as a fresh 0-d float64 device array (and steps only when ``clip.max_norm`` is given),
otherwise None.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import cupy
import numpy as np

from fastradam.backends.cuda.device_args import (
    LR_DTYPES,
    NORM_DTYPES,
    STEP_DTYPES,
    VALUE_CODES,
    _device_scalar,
    _flag_arguments,
    _lr_reference,
    capturable_lrs,
    check_norm,
)
from fastradam.backends.cuda.interop import (
    BIT_VIEWS,
    VIEW_STORAGE,
    _device_id,
    as_array,
    as_arrays,
    check_devices,
    storage_of,
    stream_order,
)
from fastradam.backends.cuda.module import (
    BLOCK,
    BLOCKS_PER_SM,
    COMPILE_OPTIONS,
    KERNEL_FILE,
    KERNEL_KINDS,
    NAME_EXPRESSIONS,
    NORM_BLOCKS,
    NORM_PACKS,
    PREPASS_KERNELS,
    STORAGE_COMBINATIONS,
    STORAGE_TYPES,
    TILE,
    Storage,
    _grid,
    _kernel,
    _tile_grid,
    check_capturable,
    compile_options,
    cuda_include_dir,
    grad_lanes,
    kernel_dir,
    kernel_name,
    kernel_source,
    lanes,
    name_expressions,
    norm_grid,
    norm_tile_grid,
    storage_of_arrays,
)
from fastradam.backends.cuda import launch, prepass
from fastradam.backends.cuda.tables import (_layout_shifts, _layout_tiles, _resident, _tensor_shifts, _tensor_tiles,
                                            _upload, index_shifts, pack_tables)
from fastradam.clipping import Clip
from fastradam.layout import SegmentArrays
from fastradam.options import GroupOptions

__all__ = [
    # the launches
    "CAPTURABLE", "bind_flat", "bind_segments", "bind_tensors", "radam_step", "radam_step_segments",
    "radam_step_tensors", "radam_step_capturable", "radam_step_segments_capturable",
    # interop: what the registry's callers use
    "BIT_VIEWS", "VIEW_STORAGE", "as_array", "as_arrays", "check_devices", "storage_of", "stream_order",
    # module
    "BLOCK", "BLOCKS_PER_SM", "COMPILE_OPTIONS", "KERNEL_FILE", "KERNEL_KINDS", "NAME_EXPRESSIONS", "NORM_BLOCKS",
    "NORM_PACKS", "PREPASS_KERNELS", "STORAGE_COMBINATIONS", "STORAGE_TYPES", "TILE", "Storage", "compile_options",
    "cuda_include_dir", "grad_lanes", "kernel_dir", "kernel_name", "kernel_source", "name_expressions", "norm_grid",
    "norm_tile_grid", "storage_of_arrays",
    # tables
    "index_shifts", "pack_tables",
    # device arguments
    "LR_DTYPES", "NORM_DTYPES", "STEP_DTYPES", "VALUE_CODES", "capturable_lrs", "check_norm",
]


#: This backend also steps with step counts (and learning rates) read on the device (torch's ``capturable``).
CAPTURABLE = True


def _flat_prologue(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray, master: cupy.ndarray | None,
                   found_inf: Any, stochastic: bool = False,
                   clipped: bool = False) -> tuple[int, int, tuple | None, Storage, int] | None:
    """What a launch over flat buffers needs: the length, the device, the kernels' ``skip, skip_code``
    (None: a host flag says skip), the storage and the grid; None when there is nothing to launch (no
    elements, or a host flag says skip), unless the launch is ``clipped`` (its norm is still computed)."""
    n = params.size
    device_id = _device_id(params)
    skip = _flag_arguments(found_inf, device_id)
    if not clipped and (n == 0 or skip is None):
        return None
    storage = storage_of_arrays(params, grads, exp_avg, master, stochastic)
    return n, device_id, skip, storage, _grid(n, lanes(storage), device_id)


def _flat_gate(storage: Storage, device_id: int, skip: tuple | None, check_finite: bool, clip: Clip | None,
               grads: cupy.ndarray, n: int, grid: int) -> prepass.Gate:
    """:func:`prepass.gate` of a launch over flat buffers (the update's gate), inside its device's context."""
    return prepass.gate(storage, device_id, skip, check_finite, clip, "flat", grid, norm_grid(n, grad_lanes(storage)),
                        functools.partial(launch.prepass_flat, grads, n))


def radam_step(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray, exp_avg_sq: cupy.ndarray,
               floats: np.ndarray, ints: np.ndarray, *, master: cupy.ndarray | None = None,
               stochastic: bool = False, found_inf: Any = False, check_finite: bool = False,
               clip: Clip | None = None) -> cupy.ndarray | None:
    """Launch one RAdam step, in place, on validated C-contiguous CuPy buffers (16-bit: bit views).

    ``floats`` (1, F) in the math dtype and ``ints`` (1, I) int32 are the host tables of
    :func:`fastradam.scalars.pack_rows`; row 0 is passed by value as one ``ElementScalars<M>``
    record (:func:`launch.scalars_record`). ``master`` is the fp32 master beside 16-bit params or,
    int16, the remainders beside bfloat16 params (with them, the fp32 master: :mod:`fastradam.rounding`);
    ``stochastic`` rounds bfloat16 params stochastically with the key of the tables' ``round_key``
    columns, an element's index in the buffers its global index.
    ``found_inf`` is a host bool (True: nothing is launched) or a 0-d device array the kernel
    reads; ``check_finite`` adds a read-only pre-pass over ``grads``. Asynchronous on CuPy's
    current stream; no host sync.

    ``clip`` clips the gradients by their global norm inside the step (:mod:`fastradam.clipping`):
    the pre-pass computes the norm instead (the finite check with ``check_finite``: a NaN/inf norm
    skips the step; a set ``found_inf`` skips it too, after the norm), and the update multiplies
    each gradient by the factor it leaves on the device, in place of the tables' inv_grad_scale
    (which must be ``clip.inv_grad_scale``). ``clip.max_norm`` None computes the norm alone;
    ``clip.norm`` (a float, or a 0-d device array: :func:`check_norm`) is the norm to clip by, then no
    gradient is read before the update. Returns the norm, a fresh 0-d float64 device array, with
    ``clip``; else None.
    """
    prologue = _flat_prologue(params, grads, exp_avg, master, found_inf, stochastic, clip is not None)
    if prologue is None:
        return None
    n, device_id, skip, storage, grid = prologue
    scalars = launch.scalars_record(np.asarray(floats, dtype=storage.math_dtype), np.asarray(ints, dtype=np.int32))
    with cupy.cuda.Device(device_id):
        gate = _flat_gate(storage, device_id, skip, check_finite, clip, grads, n, grid)
        if gate.skip is not None and n > 0:
            _kernel(device_id, storage, kernel_name("step", storage))(
                (grid,), (BLOCK,),
                launch.step((params, grads, exp_avg, exp_avg_sq), master, n, scalars, gate.skip, gate.factor))
    return gate.norm


def bind_flat(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray, exp_avg_sq: cupy.ndarray,
              master: cupy.ndarray | None = None, stochastic: bool = False) -> Callable[..., cupy.ndarray | None]:
    """A launcher of :func:`radam_step` over bound buffers: ``launch(floats, ints, found_inf, check_finite,
    clip=None)``, returning what it returns."""
    def launch_flat(floats: np.ndarray, ints: np.ndarray, found_inf: Any = False, check_finite: bool = False,
                    clip: Clip | None = None) -> cupy.ndarray | None:
        return radam_step(params, grads, exp_avg, exp_avg_sq, floats, ints, master=master, stochastic=stochastic,
                          found_inf=found_inf, check_finite=check_finite, clip=clip)
    return launch_flat


def _segments_prologue(storage: Storage, device_id: int, segments: SegmentArrays, segment_rows: np.ndarray,
                       upload: Callable[..., list[cupy.ndarray]], grads: cupy.ndarray, skip: tuple | None,
                       check_finite: bool, clip: Clip | None, *tables: np.ndarray) -> tuple | None:
    """What a launch over segments needs, inside its device's context: the device tile table, its
    length, the grid, the device copies of ``segment_rows`` and ``tables`` (by ``upload``) and the
    update's gate (:func:`prepass.gate`: the check_finite pre-pass or the clipping one, if asked; no
    update when no segment is active); None when no segment is active and there is no norm to compute."""
    tile_rows = _layout_tiles(segments, device_id)
    active = tile_rows.shape[0] > 0 and bool(np.any(segment_rows >= 0))
    if not active and clip is None:
        return None
    device_tables = upload(segment_rows, *tables)
    n_tiles = tile_rows.shape[0]
    grid = _tile_grid(n_tiles, device_id)
    gate = prepass.gate(storage, device_id, skip, check_finite, clip, "segments", grid, norm_tile_grid(n_tiles),
                        functools.partial(launch.prepass_segments, grads, tile_rows, n_tiles, device_tables[0]))
    return tile_rows, n_tiles, grid, device_tables, gate if active else gate.without_update()


def radam_step_segments(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray,
                        exp_avg_sq: cupy.ndarray, segments: SegmentArrays, segment_row: np.ndarray,
                        floats: np.ndarray, ints: np.ndarray, *, master: cupy.ndarray | None = None,
                        stochastic: bool = False, found_inf: Any = False, check_finite: bool = False,
                        clip: Clip | None = None) -> cupy.ndarray | None:
    """One launch over the segments of flat buffers; segment ``i`` uses row ``segment_row[i]`` (< 0: skipped).

    ``segment_row`` (int32, one per segment), ``floats`` (R, F, the math dtype) and ``ints``
    (R, I, int32) are host arrays, uploaded in one asynchronous copy; the layout's tile table is
    uploaded once per device. Skipped segments and the padding are neither read nor written
    (nor read by the check_finite or clipping pre-pass). ``master``, ``stochastic``, ``found_inf``,
    ``check_finite``, ``clip`` (the norm of the active segments' gradients; the factor replaces every
    row's inv_grad_scale): as in :func:`radam_step`; under stochastic rounding the global index counts
    the segments' elements in order, not the padding (the layout's :func:`index_shifts`, uploaded once
    per device).
    """
    device_id = _device_id(params)
    skip = _flag_arguments(found_inf, device_id)
    segment_row = np.asarray(segment_row, dtype=np.int32)
    if skip is None and clip is None:
        return None
    storage = storage_of_arrays(params, grads, exp_avg, master, stochastic)
    with cupy.cuda.Device(device_id):
        prologue = _segments_prologue(storage, device_id, segments, segment_row, _upload, grads, skip, check_finite,
                                      clip, np.asarray(floats, dtype=storage.math_dtype),
                                      np.asarray(ints, dtype=np.int32))
        if prologue is None:
            return None
        tile_rows, n_tiles, grid, (rows, floats_d, ints_d), gate = prologue
        if gate.skip is not None:
            shifts = _layout_shifts(segments, device_id) if stochastic else None
            _kernel(device_id, storage, kernel_name("segments", storage))(
                (grid,), (BLOCK,), launch.segments((params, grads, exp_avg, exp_avg_sq), master, tile_rows, n_tiles,
                                                   rows, floats_d, ints_d, shifts, gate.skip, gate.factor))
    return gate.norm


def bind_segments(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray, exp_avg_sq: cupy.ndarray,
                  segments: SegmentArrays, master: cupy.ndarray | None = None,
                  stochastic: bool = False) -> Callable[..., cupy.ndarray | None]:
    """A launcher of :func:`radam_step_segments` over bound buffers:
    ``launch(segment_row, floats, ints, found_inf, check_finite, clip=None)``, returning what it returns."""
    def launch_segments(segment_row: np.ndarray, floats: np.ndarray, ints: np.ndarray, found_inf: Any = False,
                        check_finite: bool = False, clip: Clip | None = None) -> cupy.ndarray | None:
        return radam_step_segments(params, grads, exp_avg, exp_avg_sq, segments, segment_row, floats, ints,
                                   master=master, stochastic=stochastic, found_inf=found_inf,
                                   check_finite=check_finite, clip=clip)
    return launch_segments


def radam_step_tensors(params: list[cupy.ndarray], grads: list[cupy.ndarray], exp_avg: list[cupy.ndarray],
                       exp_avg_sq: list[cupy.ndarray], tensor_row: np.ndarray, floats: np.ndarray,
                       ints: np.ndarray, *, master: list[cupy.ndarray] | None = None, stochastic: bool = False,
                       found_inf: Any = False, check_finite: bool = False,
                       clip: Clip | None = None) -> cupy.ndarray | None:
    """One launch over lists of separate tensors; tensor ``i`` uses row ``tensor_row[i]`` (< 0: skipped).

    The tensors (validated, C-contiguous, one storage per role, one device) are reached through a
    table of their addresses (params, grads, exp_avg, exp_avg_sq and, with ``master``, the fp32
    master or the int16 remainders; a gradient of a skipped tensor may be None); it, the tile table
    over their sizes and the host tables (with ``stochastic``, also the tensors' :func:`index_shifts`:
    the global index counts their elements in list order) go to the device in one asynchronous copy
    per call. An empty list launches nothing (with ``clip``: its norm is 0, or the given one, on the
    current device). ``stochastic``, ``found_inf``, ``check_finite``, ``clip`` (the norm of the active
    tensors' gradients): as in :func:`radam_step`.
    """
    if not params:
        return None if clip is None else prepass.norm_without_work(clip)
    device_id = _device_id(params[0])
    skip = _flag_arguments(found_inf, device_id)
    tensor_row = np.asarray(tensor_row, dtype=np.int32)
    sizes = tuple(int(a.size) for a in params)
    tile_rows = _tensor_tiles(sizes)
    active = tile_rows.shape[0] > 0 and bool(np.any(tensor_row >= 0))
    if clip is None and (skip is None or not active):
        return None
    first_grad = next((g for g in grads if g is not None), None)
    if first_grad is None:  # no gradient at all: no tensor is active
        with cupy.cuda.Device(device_id):
            return prepass.norm_without_work(clip)
    storage = storage_of_arrays(params[0], first_grad, exp_avg[0], None if master is None else master[0], stochastic)
    roles = (params, grads, exp_avg, exp_avg_sq) + (() if master is None else (master,))
    pointers = np.array([[0 if a is None else a.data.ptr for a in tensor] for tensor in zip(*roles)], dtype=np.uint64)
    with cupy.cuda.Device(device_id):
        pointers_d, tiles_d, rows, floats_d, ints_d, *shifts = _upload(
            pointers, tile_rows, tensor_row, np.asarray(floats, dtype=storage.math_dtype),
            np.asarray(ints, dtype=np.int32), *((_tensor_shifts(sizes),) if stochastic else ()))
        n_tiles = tile_rows.shape[0]
        grid = _tile_grid(n_tiles, device_id)
        gate = prepass.gate(storage, device_id, skip, check_finite, clip, "tensors", grid, norm_tile_grid(n_tiles),
                            functools.partial(launch.prepass_tensors, pointers_d, len(roles), tiles_d, n_tiles, rows))
        if gate.skip is not None and active:
            _kernel(device_id, storage, kernel_name("tensors", storage))(
                (grid,), (BLOCK,), launch.tensors(pointers_d, tiles_d, n_tiles, rows, floats_d, ints_d,
                                                  shifts[0] if shifts else None, gate.skip, gate.factor))
    return gate.norm


def bind_tensors(params: list[cupy.ndarray], grads: list[cupy.ndarray] | None, exp_avg: list[cupy.ndarray],
                 exp_avg_sq: list[cupy.ndarray], master: list[cupy.ndarray] | None = None,
                 stochastic: bool = False) -> Callable[..., cupy.ndarray | None]:
    """A launcher of :func:`radam_step_tensors` over bound tensors:
    ``launch(tensor_row, floats, ints, found_inf, check_finite, grads=None, clip=None)`` (``grads``: this
    step's), returning what it returns."""
    bound = grads

    def launch_tensors(tensor_row: np.ndarray, floats: np.ndarray, ints: np.ndarray, found_inf: Any = False,
                       check_finite: bool = False, grads: list[cupy.ndarray] | None = None,
                       clip: Clip | None = None) -> cupy.ndarray | None:
        return radam_step_tensors(params, bound if grads is None else grads, exp_avg, exp_avg_sq, tensor_row, floats,
                                  ints, master=master, stochastic=stochastic, found_inf=found_inf,
                                  check_finite=check_finite, clip=clip)
    return launch_tensors


def radam_step_capturable(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray,
                          exp_avg_sq: cupy.ndarray, step: Any, lr: Any, group: GroupOptions, *,
                          master: cupy.ndarray | None = None, stochastic: bool = False, grad_scale: float = 1.0,
                          found_inf: Any = False, check_finite: bool = False,
                          clip: Clip | None = None) -> cupy.ndarray | None:
    """Launch one capturable RAdam step whose step count (and optionally lr) live on the device.

    The kernel reads ``step`` (and ``lr``) when it runs and folds the scalars of
    :func:`fastradam.scalars.step_scalars` itself, in float64 (``radam_step_scalars`` in
    radam.cuh) from the group's ``GroupRow`` record, so the launch can be captured in a CUDA
    graph and replayed while the step advances on the device. Nothing synchronises the host.

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
    group : GroupOptions
        The validated options (its lr is unused; the flavour's threshold, comparison,
        below-threshold update and eps placement are applied on the device).
    master, grad_scale, found_inf, check_finite
        As for :func:`radam_step` (``master``: the fp32 master or the int16 remainders; ``grad_scale``
        validated: the kernel multiplies the gradient by ``1 / grad_scale``, rounded to the math dtype as the host tables round it). A device
        ``found_inf`` skips the step on the device, so a graph replays it correctly; the step
        count is the caller's to not advance.
    clip
        As for :func:`radam_step` (the factor replaces the group's ``1 / grad_scale``; ``clip.inv_grad_scale``
        must be it): the norm pre-pass and the update are the pair of launches a graph captures,
        norm, coefficient and skip flag staying on the device. Returns the norm with ``clip``, else None.

    Raises
    ------
    TypeError
        ``step`` or ``lr`` has an unsupported dtype, or ``lr`` is neither a real number nor an array.
    ValueError
        ``step`` or ``lr`` is not 0-d, is on another device, or overlaps a written buffer; or
        ``stochastic`` (stochastic rounding hashes its key from the step on the host: no capturable kernels).
    """
    check_capturable(stochastic)
    written = (params, grads, exp_avg, exp_avg_sq) + (() if master is None else (master,))
    step_array = _device_scalar("step", step, STEP_DTYPES, written)
    record, lr_address = launch.group_record(group, _lr_reference("lr", lr, written), grad_scale)
    prologue = _flat_prologue(params, grads, exp_avg, master, found_inf, clipped=clip is not None)
    if prologue is None:
        return None
    n, device_id, skip, storage, grid = prologue
    with cupy.cuda.Device(device_id):
        gate = _flat_gate(storage, device_id, skip, check_finite, clip, grads, n, grid)
        if gate.skip is not None and n > 0:
            _kernel(device_id, storage, kernel_name("capturable", storage))(
                (grid,), (BLOCK,),
                launch.capturable((params, grads, exp_avg, exp_avg_sq), master, n,
                                  (step_array, np.int32(VALUE_CODES[step_array.dtype])), lr_address, record, gate.skip,
                                  gate.factor))
    return gate.norm


def radam_step_segments_capturable(params: cupy.ndarray, grads: cupy.ndarray, exp_avg: cupy.ndarray,
                                   exp_avg_sq: cupy.ndarray, segments: SegmentArrays, segment_group: np.ndarray,
                                   steps: Any, groups: Sequence[GroupOptions], lrs: Sequence[Any], *,
                                   master: cupy.ndarray | None = None, stochastic: bool = False,
                                   grad_scale: float = 1.0, found_inf: Any = False, check_finite: bool = False,
                                   clip: Clip | None = None) -> cupy.ndarray | None:
    """One capturable launch over the segments of flat buffers, step counts read on the device.

    Segment ``i`` is stepped with the options of ``groups[segment_group[i]]`` (host int32, < 0:
    skipped) and the step count ``steps[i]``, a 1-D int32/int64/float32/float64 device array of
    one entry per segment (torch's capturable ``state["step"]`` values after their increment,
    e.g. a view of one flat tensor): the kernel folds the scalars itself, as
    :func:`radam_step_capturable` does, so the launch can be captured in a CUDA graph and
    replayed while the counts advance on the device. ``lrs[k]`` is group ``k``'s learning rate:
    a real number or a 0-d device array read by the kernel (see :func:`launch.group_tables`).
    The small tables go to the device once and are reused while they are unchanged
    (:func:`tables._resident`): make one call before capturing. ``master``, ``grad_scale``,
    ``found_inf``, ``check_finite``: as in :func:`radam_step`; ``clip``: as in
    :func:`radam_step_capturable` (the norm of the active segments' gradients); ``stochastic``:
    ValueError, as in :func:`radam_step_capturable`. Nothing synchronises the host.
    """
    check_capturable(stochastic)
    device_id = _device_id(params)
    skip = _flag_arguments(found_inf, device_id)
    if skip is None and clip is None:
        return None
    written = (params, grads, exp_avg, exp_avg_sq) + (() if master is None else (master,))
    steps_array = _device_scalar("steps", steps, STEP_DTYPES, written, shape=(len(segments.sizes),))
    if len(lrs) != len(groups):
        raise ValueError(f"lrs has {len(lrs)} entries but there are {len(groups)} groups")
    segment_group = np.asarray(segment_group, dtype=np.int32)
    if segment_group.shape != (len(segments.sizes),) or segment_group.max(initial=-1) >= len(groups):
        raise ValueError(f"segment_group must hold one group index (or -1) per segment ({len(segments.sizes)}), "
                         f"each < {len(groups)}")
    floats, ints, pointers = launch.group_tables(groups, capturable_lrs(lrs, segment_group, written), grad_scale)
    storage = storage_of_arrays(params, grads, exp_avg, master)
    with cupy.cuda.Device(device_id):
        prologue = _segments_prologue(storage, device_id, segments, segment_group,
                                      functools.partial(_resident, segments, device_id), grads, skip, check_finite,
                                      clip, floats, ints, pointers)
        if prologue is None:
            return None
        tile_rows, n_tiles, grid, (rows, floats_d, ints_d, pointers_d), gate = prologue
        if gate.skip is not None:
            _kernel(device_id, storage, kernel_name("segments_capturable", storage))(
                (grid,), (BLOCK,),
                launch.segments_capturable((params, grads, exp_avg, exp_avg_sq), master, tile_rows, n_tiles, rows,
                                           (steps_array, np.int32(VALUE_CODES[steps_array.dtype])), floats_d, ints_d,
                                           pointers_d, gate.skip, gate.factor))
    return gate.norm
