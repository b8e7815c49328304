"""The flat multi-tensor layout: many tensors packed into one buffer per role, aligned segments.

A :class:`FlatLayout` is pure bookkeeping (offsets, lengths, groups); it holds no data. The
same layout describes the params, grads, exp_avg and exp_avg_sq buffers of a model, so one
kernel launch can update every tensor of every parameter group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Hashable, Sequence

import numpy as np

#: Default segment alignment in elements: 64 elements is 256 bytes in float32, a multiple of
#: every vector width (AVX-512, CUDA 16-byte loads) and of a cache line.
DEFAULT_ALIGN = 64


@dataclass(frozen=True)
class Segment:
    """One tensor's place in the flat buffers."""

    name: Hashable
    shape: tuple[int, ...]
    offset: int
    size: int
    group: int


def tiles(offsets: np.ndarray, sizes: np.ndarray, tile: int) -> np.ndarray:
    """The ``(K, 3)`` int64 tiles ``(start, stop, index)`` of ranges ``[offsets[i], offsets[i] + sizes[i])``.

    Range ``i`` is cut into ``ceil(sizes[i] / tile)`` tiles of at most ``tile`` elements,
    starting at ``offsets[i]``; empty ranges get none. Both backends cut their work this way.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = -(-sizes // tile)
    index = np.repeat(np.arange(sizes.size, dtype=np.int64), counts)
    rank = np.arange(index.size, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    start = offsets[index] + rank * tile
    return np.stack([start, np.minimum(start + tile, offsets[index] + sizes[index]), index], axis=1)


def index_shifts(offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Stochastic rounding's global index shift of each range (a segment or a tensor), int64: the
    element at position ``k`` of range ``i``'s buffer has global index ``k + shift[i]``, where
    ``shift[i] = sizes[0] + ... + sizes[i-1] - offsets[i]`` (the ranges concatenated in order, no
    padding between them). Both backends index their work this way."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.cumsum(sizes) - sizes - np.asarray(offsets, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class SegmentArrays:
    """The segment table as read-only int64 arrays. What a backend derives from it (block and
    tile tables, their device copies) lives with the plan or the backend, never here."""

    offsets: np.ndarray
    sizes: np.ndarray
    groups: np.ndarray


class FlatLayout:
    """Packs tensors of the given shapes into flat buffers, each segment starting aligned.

    Parameters
    ----------
    shapes : sequence of tuple of int
        The tensors' shapes, in order.
    names : sequence of hashable, optional
        A name per tensor (default: its index), usable in :meth:`view`.
    groups : sequence of int, optional
        The parameter group of each tensor (default: all 0).
    align : int, default 64
        Every segment starts at a multiple of ``align`` elements; the gaps (padding) are never
        read or written by a step.

    Examples
    --------
    >>> layout = FlatLayout([(3, 4), (5,)], names=["w", "b"])
    >>> layout.size, [s.offset for s in layout.segments]
    (128, [0, 64])
    """

    def __init__(self, shapes: Sequence[Sequence[int]], *, names: Sequence[Hashable] | None = None,
                 groups: Sequence[int] | None = None, align: int = DEFAULT_ALIGN) -> None:
        shapes = [tuple(int(d) for d in shape) for shape in shapes]
        names = list(range(len(shapes))) if names is None else list(names)
        groups = [0] * len(shapes) if groups is None else [int(g) for g in groups]
        if not (isinstance(align, int) and align >= 1):
            raise ValueError(f"align must be an int >= 1, got {align!r}")
        if len(names) != len(shapes) or len(groups) != len(shapes):
            raise ValueError(f"names ({len(names)}) and groups ({len(groups)}) must match shapes ({len(shapes)})")
        if len(set(names)) != len(names):
            raise ValueError("names must be distinct")
        if any(g < 0 for g in groups):
            raise ValueError("groups must be >= 0")
        if any(d < 0 for shape in shapes for d in shape):
            raise ValueError("shapes must have non-negative dimensions")
        segments, offset = [], 0
        for name, shape, group in zip(names, shapes, groups):
            size = math.prod(shape)
            segments.append(Segment(name, shape, offset, size, group))
            offset += -(-size // align) * align
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.size: int = offset
        self.align: int = align
        self._index = {s.name: i for i, s in enumerate(segments)}

    def __len__(self) -> int:
        return len(self.segments)

    def __repr__(self) -> str:
        return f"FlatLayout({len(self)} segments, size={self.size}, align={self.align})"

    @classmethod
    def for_arrays(cls, arrays: Sequence[Any], **kwargs: Any) -> FlatLayout:
        """A layout for tensors shaped like ``arrays``."""
        return cls([a.shape for a in arrays], **kwargs)

    @cached_property
    def arrays(self) -> SegmentArrays:
        """The segment table as read-only int64 arrays (computed once)."""
        table = self.segment_table()
        columns = [np.ascontiguousarray(table[:, i]) for i in range(3)]
        for column in columns:
            column.flags.writeable = False
        return SegmentArrays(*columns)

    def segment_table(self) -> np.ndarray:
        """An ``(n_segments, 3)`` int64 array of ``(offset, size, group)`` rows."""
        return np.array([(s.offset, s.size, s.group) for s in self.segments], dtype=np.int64).reshape(-1, 3)

    def zeros(self, dtype: Any = np.float32, xp: Any = np) -> Any:
        """A zeroed flat buffer for this layout (``xp`` is ``numpy`` or ``cupy``)."""
        return xp.zeros(self.size, dtype=dtype)

    def pack(self, arrays: Sequence[Any], out: Any = None, *, dtype: Any = None, xp: Any = np) -> Any:
        """Copy ``arrays`` into a flat buffer (a new zeroed one unless ``out`` is given)."""
        if len(arrays) != len(self.segments):
            raise ValueError(f"expected {len(self.segments)} arrays, got {len(arrays)}")
        if out is None:
            if dtype is None:
                dtype = arrays[0].dtype if arrays else np.float32
            out = self.zeros(dtype, xp)
        for segment, array in zip(self.segments, arrays):
            if tuple(array.shape) != segment.shape:
                raise ValueError(f"array for segment {segment.name!r} has shape {tuple(array.shape)}, "
                                 f"expected {segment.shape}")
            out[segment.offset:segment.offset + segment.size] = array.reshape(-1)
        return out

    def view(self, flat: Any, key: Hashable) -> Any:
        """The zero-copy view of one tensor (by name) inside a flat buffer."""
        s = self.segments[self._index[key]]
        return flat[s.offset:s.offset + s.size].reshape(s.shape)

    def unpack(self, flat: Any) -> list[Any]:
        """Zero-copy views of every tensor inside a flat buffer, in order."""
        return [flat[s.offset:s.offset + s.size].reshape(s.shape) for s in self.segments]
