"""Tables: the tile tables and small per-call tables the kernels read, and how they reach the device.

A flat step passes its one row of scalars by value (no copy). A layout's tile table goes to the
device once per device; the small per-call tables (rows, scalars, a tensor list's pointers and
tiles) go in one asynchronous host-to-device copy on the current stream, into memory from
CuPy's pool (which reuses a block only on the stream it was freed on, so a later call cannot
overwrite a table that a queued launch still reads). The capturable segments launch keeps its
tables resident instead (:func:`_resident`), so a CUDA graph captured after a first call
uploads nothing.

What is derived from a layout (its host tile table, their device copies, the resident tables)
is kept here, in :data:`_LAYOUT_TABLES`, keyed weakly by the layout's
:class:`~fastradam.layout.SegmentArrays`: it dies with the layout, and the layout itself holds
no device memory.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Sequence

import cupy
import numpy as np

from fastradam.backends.cuda.module import TILE
from fastradam.layout import SegmentArrays, index_shifts, tiles

#: Byte alignment of each table inside the one per-call upload.
_TABLE_ALIGN = 16
#: Distinct table contents :func:`_resident` keeps per layout and device (besides the pinned ones).
_RESIDENT_TABLES = 8

#: Per layout (weakly: an entry dies with its ``SegmentArrays``): ``"tiles"``, the host tile
#: table, and ``"shifts"``, its :func:`index_shifts` (stochastic rounding); ``("tiles", device)``
#: and ``("shifts", device)``, their copies on that device; ``("resident", device)``, the
#: resident tables of :func:`_resident` on that device.
_LAYOUT_TABLES: weakref.WeakKeyDictionary[SegmentArrays, dict] = weakref.WeakKeyDictionary()


def _layout_cache(segments: SegmentArrays) -> dict:
    """The backend's cache for one layout (created empty on first use)."""
    cache = _LAYOUT_TABLES.get(segments)
    if cache is None:
        cache = _LAYOUT_TABLES[segments] = {}
    return cache


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


def table_views(buffer: Any, offsets: tuple[int, ...], tables: Sequence[np.ndarray]) -> list[Any]:
    """The 1-D views of ``tables`` inside ``buffer`` (a device copy of :func:`pack_tables`' bytes, or
    those bytes themselves in the CPU harness) at ``offsets``, each in its table's dtype."""
    return [buffer[start:start + table.nbytes].view(table.dtype) for table, start in zip(tables, offsets)]


def _upload(*tables: np.ndarray) -> list[cupy.ndarray]:
    """Device copies of ``tables`` (1-D views into one pooled allocation), by one async copy."""
    packed, offsets = pack_tables(*tables)
    device = cupy.empty(packed.size, dtype=np.uint8)
    device.set(packed, stream=cupy.cuda.get_current_stream())
    return table_views(device, offsets, tables)


def _resident(segments: SegmentArrays, device_id: int, *tables: np.ndarray) -> list[cupy.ndarray]:
    """Device copies of small tables, kept per layout and device while their content is unchanged.

    A call repeated with the same tables uploads nothing, so a step captured in a CUDA graph
    after one call outside it (as torch asks of capturable optimizers) issues no host-to-device
    copy inside the capture. The last few distinct contents are kept, and those used during a
    capture for good: a graph keeps reading their addresses at every replay.
    """
    packed, offsets = pack_tables(*tables)
    cache = _layout_cache(segments).setdefault(("resident", device_id), {})
    key = packed.tobytes()
    stream = cupy.cuda.get_current_stream()
    entry = cache.pop(key, None)
    if entry is None:
        device = cupy.empty(packed.size, dtype=np.uint8)
        device.set(packed, stream=stream)
        entry = (table_views(device, offsets, tables), False)
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


def _layout_table(segments: SegmentArrays, device_id: int, name: str,
                  build: Callable[[SegmentArrays], np.ndarray]) -> cupy.ndarray:
    """The layout's table ``name`` on ``device_id``: built on the host (by ``build``, once) and uploaded
    once per device."""
    cached = _layout_cache(segments)
    if name not in cached:
        cached[name] = build(segments)
    if (name, device_id) not in cached:
        with cupy.cuda.Device(device_id):
            cached[(name, device_id)] = cupy.asarray(cached[name])
    return cached[(name, device_id)]


def _layout_tiles(segments: SegmentArrays, device_id: int) -> cupy.ndarray:
    """The layout's tile table on ``device_id``."""
    return _layout_table(segments, device_id, "tiles", lambda s: tiles(s.offsets, s.sizes, TILE))


def _layout_shifts(segments: SegmentArrays, device_id: int) -> cupy.ndarray:
    """The layout's :func:`index_shifts` on ``device_id`` (stochastic rounding)."""
    return _layout_table(segments, device_id, "shifts", lambda s: index_shifts(s.offsets, s.sizes))


@functools.lru_cache(maxsize=64)
def _tensor_shifts(sizes: tuple[int, ...]) -> np.ndarray:
    """A tensor list's :func:`index_shifts` (offsets 0): the sizes of the tensors before each."""
    shifts = index_shifts(np.zeros(len(sizes), dtype=np.int64), np.array(sizes, dtype=np.int64))
    shifts.flags.writeable = False
    return shifts


@functools.lru_cache(maxsize=64)
def _tensor_tiles(sizes: tuple[int, ...]) -> np.ndarray:
    table = tiles(np.zeros(len(sizes), dtype=np.int64), np.array(sizes, dtype=np.int64), TILE)
    table.flags.writeable = False
    return table
