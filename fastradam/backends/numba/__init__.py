"""The Numba backend: NumPy buffers on the CPU (:mod:`fastradam.backends` describes the protocol).

Its rooms: :mod:`.kernels` (the element update, the block loops, the address-table loops, the
non-finite passes), :mod:`.storage` (16-bit bit conversions), :mod:`.bf16_lanes` (the explicit
AVX-512 all-bfloat16 loop), :mod:`.target` (the CPU compiled for and the vector width asked).
This face binds validated buffers into launchers: everything that depends only on the buffers
(flat views, block and address tables) is settled once, at bind time.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np

from fastradam.backends.numba.kernels import (
    BIT_VIEWS,
    BLOCK,
    SERIAL_UP_TO,
    _non_finite_blocks,
    _non_finite_tensor_blocks,
    _radam_blocks,
    _radam_tensor_blocks,
)
from fastradam.backends.numba.norms import norm_blocks, norm_tensor_blocks, total_of
from fastradam.clipping import Clip, clip_coefficient, finish_norm
from fastradam.layout import SegmentArrays, index_shifts, tiles
from fastradam.spec import SCALAR_INDEX


def blocks(offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(start, stop, segment)`` columns of the :data:`BLOCK`-element tiles of the given ranges."""
    table = tiles(offsets, sizes, BLOCK)
    return tuple(np.ascontiguousarray(table[:, k]) for k in range(3))


@functools.lru_cache(maxsize=16)
def _flat_blocks(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    start, stop, segment = blocks(np.zeros(1, np.int64), np.array([size]))
    for a in (start, stop, segment):
        a.flags.writeable = False
    return start, stop, segment.astype(np.int32)


@functools.lru_cache(maxsize=64)
def _storage_name(dtype: np.dtype) -> str:
    name = dtype.name
    return name if dtype.isnative else f"{name} (non-native byte order)"


def storage_of(obj: np.ndarray) -> str:
    """The storage format of a NumPy array: its dtype's name (``bfloat16`` for ml_dtypes'), marked
    when the byte order is not the machine's (the kernels read native values only)."""
    return _storage_name(obj.dtype)


@functools.lru_cache(maxsize=64)
def _bit_view(dtype: np.dtype) -> np.dtype | None:
    view = BIT_VIEWS.get(dtype.name)
    return None if view is None else np.dtype(view)


def as_array(obj: np.ndarray) -> np.ndarray:
    """The array the kernels take, zero-copy: a plain ndarray (a subclass such as ``np.matrix``
    or ``np.memmap`` is viewed as one), as the bit view of a 16-bit float array."""
    plain = obj if type(obj) is np.ndarray else obj.view(np.ndarray)
    view = _bit_view(obj.dtype)
    return plain if view is None else plain.view(view)


def as_arrays(objects: Sequence[np.ndarray]) -> list[np.ndarray]:
    """:func:`as_array` of each object."""
    return [as_array(obj) for obj in objects]


def stream_order(objects: Sequence[np.ndarray]) -> None:
    """Host arrays need no ordering before a launch (the steps run synchronously)."""


def check_devices(arrays: Sequence[np.ndarray], names: Sequence[str] = ()) -> None:
    """Host arrays all live in one memory space: nothing to check."""


def _flat(array: np.ndarray | None) -> np.ndarray | None:
    return array if array is None or array.ndim == 1 else array.reshape(-1)


def _skipped(found_inf: bool, check_finite: bool, grads: np.ndarray, start: np.ndarray, stop: np.ndarray,
             rows: np.ndarray, serial: bool) -> bool:
    """A step is skipped when ``found_inf`` is set, or when asked to check and an active
    gradient element is NaN/inf (one read-only pass, before anything is written)."""
    return bool(found_inf) or (check_finite and _non_finite_blocks(grads, start, stop, rows, serial) > 0)


#: This backend steps with host scalars only: no device step counts (torch's ``capturable``).
CAPTURABLE = False
_INV_GRAD_SCALE = SCALAR_INDEX["inv_grad_scale"]


def _clipped(clip: Clip, norm_of: Callable[[int, float], np.ndarray], floats: np.ndarray, found_inf: bool,
             check_finite: bool) -> tuple[float, bool]:
    """A clipped step's norm (:mod:`fastradam.clipping`: the pre-pass ``norm_of(code, power)``'s
    block partials unless ``clip.norm`` is given) and whether the step goes on; when it does, the
    tables' gradient factor is set, in place, to ``inv_grad_scale * coefficient`` (rounded once)."""
    if clip.norm is None:
        code = clip.code
        norm = finish_norm(total_of(norm_of(code, clip.norm_type), code), clip.norm_type, clip.inv_grad_scale)
    else:
        norm = float(clip.norm)
    if clip.max_norm is None or found_inf or (check_finite and not math.isfinite(norm)):
        return norm, False
    floats[:, _INV_GRAD_SCALE] = clip.inv_grad_scale * clip_coefficient(norm, clip.max_norm)
    return norm, True


def _global_index(stochastic: bool, shifts: np.ndarray, start: np.ndarray, piece: np.ndarray) -> np.ndarray | None:
    """Stochastic rounding's global index of each block's first element (None without it): block
    ``b`` starts at ``start[b]`` in piece ``piece[b]``'s buffer, whose :func:`index_shifts` are ``shifts``."""
    return (shifts[piece] + start).astype(np.int64) if stochastic else None


def bind_flat(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
              master: np.ndarray | None = None, stochastic: bool = False) -> Callable[..., None]:
    """A launcher of steps over validated buffers (any shape, flat in memory):
    ``launch(floats, ints, found_inf, check_finite)`` with one-row tables. ``master`` is the fp32
    master or the int16 remainders (its dtype says which); ``stochastic`` rounds bfloat16 params
    stochastically (the keys in the tables' ``round_key`` columns, the element's index in the buffer
    its global index). Everything that depends only on the buffers (flat views, the block table)
    is settled here, once."""
    start, stop, row = _flat_blocks(params.size)
    index = start if stochastic else None
    serial = params.size <= SERIAL_UP_TO
    params, grads, exp_avg, exp_avg_sq, master = (_flat(a) for a in (params, grads, exp_avg, exp_avg_sq, master))

    def norm_of(code: int, power: float) -> np.ndarray:
        return norm_blocks(grads, start, stop, row, code, power, serial)

    def launch(floats: np.ndarray, ints: np.ndarray, found_inf: bool = False, check_finite: bool = False,
               clip: Clip | None = None) -> float | None:
        if clip is not None:
            norm, go_on = _clipped(clip, norm_of, floats, found_inf, check_finite)
            if go_on:
                _radam_blocks(params, grads, exp_avg, exp_avg_sq, master, start, stop, row, index, floats, ints,
                              serial)
            return norm
        if not _skipped(found_inf, check_finite, grads, start, stop, row, serial):
            _radam_blocks(params, grads, exp_avg, exp_avg_sq, master, start, stop, row, index, floats, ints, serial)
        return None
    return launch


def bind_segments(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray,
                  segments: SegmentArrays, master: np.ndarray | None = None,
                  stochastic: bool = False) -> Callable[..., None]:
    """A launcher of steps over the segments of flat buffers:
    ``launch(segment_row, floats, ints, found_inf, check_finite)``, segment ``i`` with row
    ``segment_row[i]`` (< 0: skipped); ``master`` and ``stochastic`` as for :func:`bind_flat`
    (the global index counts the segments' elements in order, not the padding between them).
    The block table is cut here, once."""
    start, stop, segment = blocks(segments.offsets, segments.sizes)
    index = _global_index(stochastic, index_shifts(segments.offsets, segments.sizes), start, segment)
    serial = int(segments.sizes.sum()) <= SERIAL_UP_TO

    def launch(segment_row: np.ndarray, floats: np.ndarray, ints: np.ndarray, found_inf: bool = False,
               check_finite: bool = False, clip: Clip | None = None) -> float | None:
        rows = segment_row[segment]
        if clip is not None:
            norm, go_on = _clipped(clip, lambda code, power: norm_blocks(grads, start, stop, rows, code, power, serial),
                                   floats, found_inf, check_finite)
            if go_on:
                _radam_blocks(params, grads, exp_avg, exp_avg_sq, master, start, stop, rows, index, floats, ints,
                              serial)
            return norm
        if not _skipped(found_inf, check_finite, grads, start, stop, rows, serial):
            _radam_blocks(params, grads, exp_avg, exp_avg_sq, master, start, stop, rows, index, floats, ints, serial)
        return None
    return launch


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def bind_tensors(params: list[np.ndarray], grads: list[np.ndarray] | None, exp_avg: list[np.ndarray],
                 exp_avg_sq: list[np.ndarray], master: list[np.ndarray] | None = None,
                 stochastic: bool = False) -> Callable[..., None]:
    """A launcher of steps over lists of separate tensors, through one table of their addresses:
    ``launch(tensor_row, floats, ints, found_inf, check_finite, grads=None)``, tensor ``i`` with
    row ``tensor_row[i]`` (< 0: skipped); ``grads`` (validated arrays) replaces the bound
    gradients for one step (needed when none were bound); ``master`` and ``stochastic`` as for
    :func:`bind_flat` (the global index counts the tensors' elements in list order). The address,
    size and block tables are built here, once."""
    roles = [params, grads or [None] * len(params), exp_avg, exp_avg_sq] + ([] if master is None else [master])
    addresses = np.array([[0 if a is None else _address(a) for a in tensor] for tensor in zip(*roles)],
                         dtype=np.int64).reshape(-1, len(roles))
    sizes = np.array([a.size for a in params], dtype=np.int64)
    start, stop, tensor = blocks(np.zeros_like(sizes), sizes)
    index = _global_index(stochastic, index_shifts(np.zeros_like(sizes), sizes), start, tensor)
    serial = int(sizes.sum()) <= SERIAL_UP_TO
    p_like, m_like = (np.empty(0, dtype=x[0].dtype) for x in (params, exp_avg))
    bound_g_like = None if grads is None else np.empty(0, dtype=grads[0].dtype)
    master_like = None if master is None else np.empty(0, dtype=master[0].dtype)

    def launch(tensor_row: np.ndarray, floats: np.ndarray, ints: np.ndarray, found_inf: bool = False,
               check_finite: bool = False, grads: list[np.ndarray] | None = None,
               clip: Clip | None = None) -> float | None:
        if not params or (found_inf and clip is None):
            return None if clip is None else 0.0
        table, g_like = addresses, bound_g_like
        if grads is not None:
            table = addresses.copy()
            table[:, 1] = [0 if g is None else _address(g) for g in grads]
            g_like = np.empty(0, dtype=next(g for g in grads if g is not None).dtype)
        if clip is not None:
            norm, go_on = _clipped(clip, lambda code, power: norm_tensor_blocks(
                table, start, stop, tensor, tensor_row, g_like, code, power, serial), floats, found_inf, check_finite)
            if go_on:
                _radam_tensor_blocks(table, sizes, start, stop, tensor, tensor_row, index, floats, ints, p_like,
                                     g_like, m_like, master_like, serial)
            return norm
        if check_finite and _non_finite_tensor_blocks(table, start, stop, tensor, tensor_row, g_like, serial) > 0:
            return None
        _radam_tensor_blocks(table, sizes, start, stop, tensor, tensor_row, index, floats, ints, p_like, g_like,
                             m_like, master_like, serial)
        return None
    return launch
