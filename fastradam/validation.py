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
from fastradam.storage import BUFFER_NAMES, ROLES

#: Which of the four buffers a step writes; ``grads`` is only read.
WRITTEN = tuple(role.written for role in ROLES)


def check_per_tensor(name: str, values: Any, count: int, kind: str, active: np.ndarray | None = None) -> np.ndarray:
    """A 1-D host array of ``count`` entries: ``kind`` "step" (ints >= 1 where ``active``),
    "group" (ints >= 0) or "mask" (bools)."""
    array = np.asarray(values)
    if array.shape != (count,):
        raise ValueError(f"{name} must have one entry per tensor ({count}), got shape {array.shape}")
    if count == 0:  # np.asarray([]) is float64: an empty list is fine for any kind
        return np.zeros(0, dtype=np.bool_ if kind == "mask" else np.int64)
    if kind == "mask":
        if array.dtype != np.bool_:
            raise TypeError(f"{name} must be booleans, got dtype {array.dtype}")
        return array
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {array.dtype}")
    smallest, largest = (1, MAX_STEP) if kind == "step" else (0, np.iinfo(np.int64).max)
    checked = array if active is None else array[active]
    if checked.size and not smallest <= checked.min() <= checked.max() <= largest:
        raise ValueError(f"{name} must be in [{smallest}, {largest}], got values from {checked.min()} "
                         f"to {checked.max()}")
    return array.astype(np.int64, copy=False)


def check_buffers(buffers: Sequence[Any], names: Sequence[str] = BUFFER_NAMES,
                  written: Sequence[bool] = WRITTEN) -> None:
    """Check buffers a step will use before it writes any of them: they must share the first
    one's shape and be C-contiguous, and the ``written`` ones writeable."""
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
