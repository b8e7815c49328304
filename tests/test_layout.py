"""The flat layout: aligned segments, zero-copy views, pack/unpack round trips."""

from __future__ import annotations

import numpy as np
import pytest

from fastradam.layout import FlatLayout, tiles


def test_segments_start_aligned_and_padding_is_accounted():
    layout = FlatLayout([(3, 4), (5,), (), (0,), (64,), (65,)], align=64)
    assert [s.offset for s in layout.segments] == [0, 64, 128, 192, 192, 256]
    assert [s.size for s in layout.segments] == [12, 5, 1, 0, 64, 65]
    assert layout.size == 384
    assert all(s.offset % 64 == 0 for s in layout.segments)


def test_pack_unpack_round_trip_with_zero_copy_views():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in [(3, 4), (7,), (2, 2, 2)]]
    layout = FlatLayout.for_arrays(arrays, names=["a", "b", "c"])
    flat = layout.pack(arrays)
    assert flat.dtype == np.float32 and flat.shape == (layout.size,)
    views = layout.unpack(flat)
    for original, view in zip(arrays, views):
        np.testing.assert_array_equal(original, view)
        assert np.shares_memory(view, flat)
    layout.view(flat, "b")[0] = 42.0
    assert flat[layout.segments[1].offset] == 42.0


def test_padding_is_zero_after_pack():
    layout = FlatLayout([(3,), (2,)], align=8)
    flat = layout.pack([np.ones(3), np.ones(2)])
    np.testing.assert_array_equal(flat, [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0])


def test_segment_table():
    layout = FlatLayout([(3,), (70,)], groups=[1, 0])
    np.testing.assert_array_equal(layout.segment_table(), [[0, 3, 1], [64, 70, 0]])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"names": ["a"]}, "must match shapes"),
        ({"groups": [0, 1, 2]}, "must match shapes"),
        ({"names": ["a", "a"]}, "names must be distinct"),
        ({"groups": [0, -1]}, "groups must be >= 0"),
        ({"align": 0}, "align must be an int >= 1"),
    ],
)
def test_bad_layouts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlatLayout([(2,), (3,)], **kwargs)


def test_pack_checks_count_and_shapes():
    layout = FlatLayout([(2,), (3,)])
    with pytest.raises(ValueError, match="expected 2 arrays"):
        layout.pack([np.ones(2)])
    with pytest.raises(ValueError, match="has shape"):
        layout.pack([np.ones(2), np.ones(4)])


@pytest.mark.parametrize("tile", [1, 7, 4096])
def test_tiles_cover_every_range_exactly_once(tile):
    rng = np.random.default_rng(0)
    sizes = np.array([0, 1, 3, 63, 64, 65, 1000, 3 * tile, 3 * tile + 1, 0], dtype=np.int64)
    offsets = np.cumsum(np.concatenate([[5], sizes[:-1] + rng.integers(0, 100, sizes.size - 1)]))
    table = tiles(offsets, sizes, tile)
    assert table.dtype == np.int64 and table.shape[1] == 3 and table.flags.c_contiguous
    start, stop, index = table.T
    assert np.all((stop > start) & (stop - start <= tile))
    assert np.all((start - offsets[index]) % tile == 0)
    covered = np.zeros(int(offsets[-1] + sizes[-1]), dtype=np.int64)
    for a, b in zip(start, stop):
        covered[a:b] += 1
    want = np.zeros_like(covered)
    for offset, size in zip(offsets, sizes):
        want[offset:offset + size] = 1
    np.testing.assert_array_equal(covered, want)
    assert tiles(np.zeros(0), np.zeros(0), tile).shape == (0, 3)
