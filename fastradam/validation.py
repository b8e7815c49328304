"""Array checks of the step functions, run before any byte is written.

Buffer checks read only the array-interface protocols (``__array_interface__`` for host
arrays, ``__cuda_array_interface__`` for device arrays), so they are the same for every
backend and need no backend import. Errors are TypeError (wrong kind of thing) or
ValueError (right kind, wrong value), and name the argument. Option checks live with the
options (:mod:`fastradam.options`), storage rules with the formats (:mod:`fastradam.storage`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fastradam.options import MAX_STEP
from fastradam.storage import BUFFER_NAMES, WRITTEN


def _per_tensor(name: str, values: Any, count: int) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != (count,):
        raise ValueError(f"{name} must have one entry per tensor ({count}), got shape {array.shape}")
    return array


def _integers(name: str, array: np.ndarray) -> None:
    if array.dtype.kind not in "iu":  # signed or unsigned integers (not bool: kind "b")
        raise TypeError(f"{name} must be integers, got dtype {array.dtype}")


def check_mask(name: str, values: Any, count: int) -> np.ndarray:
    """A 1-D host array of ``count`` booleans (e.g. ``has_grad``)."""
    array = _per_tensor(name, values, count)
    if count == 0:  # np.asarray([]) is float64: an empty list is fine
        return np.zeros(0, dtype=np.bool_)
    if array.dtype != np.bool_:
        raise TypeError(f"{name} must be booleans, got dtype {array.dtype}")
    return array


def check_indices(name: str, values: Any, count: int) -> np.ndarray:
    """A 1-D host int64 array of ``count`` indices >= 0 (e.g. ``group_index``)."""
    array = _per_tensor(name, values, count)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    _integers(name, array)
    if array.min() < 0:
        raise ValueError(f"{name} must be >= 0, got values from {array.min()} to {array.max()}")
    return array.astype(np.int64, copy=False)


def check_steps(name: str, values: Any, count: int, active: np.ndarray | None = None,
                all_active: bool = False) -> tuple[np.ndarray, int, int]:
    """A 1-D host int64 array of ``count`` step numbers, each in [1, 2**53] where ``active`` (every
    one with ``all_active``), and the smallest and largest active one (0, 0 when none is active)."""
    array = _per_tensor(name, values, count)
    if count == 0:
        return np.zeros(0, dtype=np.int64), 0, 0
    _integers(name, array)
    checked = array if active is None or all_active else array[active]
    if not checked.size:
        return array.astype(np.int64, copy=False), 0, 0
    smallest, largest = int(checked.min()), int(checked.max())
    if not 1 <= smallest <= largest <= MAX_STEP:
        raise ValueError(f"{name} must be in [1, {MAX_STEP}], got values from {smallest} to {largest}")
    return array.astype(np.int64, copy=False), smallest, largest


def check_buffers(buffers: Sequence[Any], names: Sequence[str] = BUFFER_NAMES,
                  written: Sequence[bool] | None = None) -> None:
    """Check buffers a step will use before it writes any of them: they must share the first
    one's shape and be C-contiguous, and the ``written`` ones writeable (default: the roles named,
    as :data:`fastradam.storage.WRITTEN` says)."""
    if written is None:
        written = [WRITTEN[name] for name in names]
    shape = buffers[0].shape
    for name, array, writes in zip(names, buffers, written):
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape} but {names[0]} has {shape}: "
                             "the buffers of a tensor must share one shape")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        if writes and _read_only(array):
            raise ValueError(f"{name} is read-only, but a step writes it in place")


def _read_only(array: Any) -> bool:
    if isinstance(array, np.ndarray):
        return not array.flags.writeable
    return array.__cuda_array_interface__["data"][1]


def address_spans(buffers: Sequence[Any]) -> list[tuple[int, int]]:
    """Each buffer's ``(start, end)`` address span, for :func:`check_disjoint`."""
    spans = []
    for array in buffers:
        interface = array.__array_interface__ if isinstance(array, np.ndarray) else array.__cuda_array_interface__
        address = interface["data"][0]
        spans.append((address, address + array.size * array.itemsize))
    return spans


def own_their_memory(objects: Sequence[Any]) -> bool:
    """Whether ``objects`` are distinct NumPy arrays that each own their memory (no base): such
    arrays cannot overlap, so :func:`check_disjoint` has nothing to find among them."""
    return (all(type(obj) is np.ndarray and obj.base is None for obj in objects)
            and len({id(obj) for obj in objects}) == len(objects))


def check_disjoint(names: Sequence[str], spans: Sequence[tuple[int, int]]) -> None:
    """ValueError naming two buffers whose memory overlaps; empty buffers overlap nothing.

    Sorted by start, the spans are disjoint exactly when each ends before the next begins.
    """
    order = sorted((start, i, end) for i, (start, end) in enumerate(spans) if end > start)
    for (_, first, end), (start, second, _) in zip(order, order[1:]):
        if start < end:
            first, second = sorted((first, second))
            raise ValueError(f"{names[first]} and {names[second]} share memory: the buffers must be distinct")
