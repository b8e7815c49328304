"""The CPU harness of the CUDA kernels: kernels/radam.cu built by g++ with kernels/host_shim.h.

The very file CuPy compiles is built into a shared library (cached in the temp folder by a
hash of the sources and flags) and driven through ctypes on NumPy arrays, so the kernels'
element math, scalar folding, grid-stride indexing, tile tables and head/vector/tail split run
on the CPU. The multi-tensor calls take their tables from the CUDA backend's own host-side
builders (``fastradam.layout.tiles``, ``pack_tables``), so those are checked too.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastradam.flavours import PRESETS, Flavour, resolve_flavour
from fastradam.layout import FlatLayout
from fastradam.scalars import StepScalars, pack_rows, step_scalars
from oracle_check import assert_matches_oracle

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
HARNESS = Path(__file__).with_name("cuda_harness.cpp")
SOURCES = (KERNELS / "radam.cu", KERNELS / "radam.cuh", KERNELS / "host_shim.h", HARNESS)
#: Warnings are errors; no FMA contraction (as the GPU build's --fmad=false); the shim's 16-byte
#: pack loads alias float/double storage.
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing",
         "-Wall", "-Wextra", "-Werror")
_C_TYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


def compiler() -> str | None:
    """The host C++ compiler: ``$CXX``, else g++ on the PATH (None when there is none)."""
    return os.environ.get("CXX") or shutil.which("g++")


def build() -> ctypes.CDLL:
    """Build (once per source hash) and load the harness library."""
    cxx = compiler()
    digest = hashlib.sha256(" ".join((cxx,) + FLAGS).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    folder = Path(tempfile.gettempdir()) / f"fastradam-cuda-harness-{digest.hexdigest()[:16]}"
    library = folder / "harness.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"harness.{os.getpid()}.so"
        subprocess.run([cxx, *FLAGS, f"-I{KERNELS}", str(HARNESS), "-o", str(partial)],
                       check=True, capture_output=True, text=True)
        os.replace(partial, library)
    return ctypes.CDLL(str(library))


def _pointer(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


@dataclass
class Harness:
    """Typed calls into the harness library."""

    lib: ctypes.CDLL

    def counts(self) -> tuple[int, int]:
        """Elements updated by 16-byte packs and one at a time since the last launch began."""
        out = np.zeros(2, dtype=np.int64)
        self.lib.read_counts(_pointer(out))
        return int(out[0]), int(out[1])

    def step(self, buffers: tuple[np.ndarray, ...], floats: np.ndarray, ints: np.ndarray, grid: int,
             block: int) -> None:
        """Run ``radam_step<T>`` with row 0 of the host tables (``pack_rows``) passed by value."""
        p = buffers[0]
        c_type = _C_TYPES[p.dtype]
        self.lib.reset_counts()
        getattr(self.lib, f"radam_step_{p.dtype.name}")(
            ctypes.c_uint(grid), ctypes.c_uint(block), *map(_pointer, buffers), ctypes.c_longlong(p.size),
            *(c_type(x) for x in floats[0]), *(ctypes.c_int(x) for x in ints[0]))

    def step_segments(self, buffers: tuple[np.ndarray, ...], segments, segment_row: np.ndarray,
                      floats: np.ndarray, ints: np.ndarray, grid: int, block: int) -> None:
        """Run ``radam_step_segments<T>`` over ``segments`` (a ``SegmentArrays``), tables as the backend makes them."""
        from fastradam.backends.cuda import TILE, pack_tables
        from fastradam.layout import tiles

        table = tiles(segments.offsets, segments.sizes, TILE)
        packed, offsets = pack_tables(table, np.asarray(segment_row, np.int32), floats, ints)
        tiles_at, rows_at, floats_at, ints_at = (ctypes.c_void_p(packed.ctypes.data + o) for o in offsets)
        self.lib.reset_counts()
        getattr(self.lib, f"radam_step_segments_{buffers[0].dtype.name}")(
            ctypes.c_uint(grid), ctypes.c_uint(block), *map(_pointer, buffers), tiles_at,
            ctypes.c_longlong(table.shape[0]), rows_at, floats_at, ints_at)

    def step_tensors(self, tensors: list[tuple[np.ndarray, ...]], tensor_row: np.ndarray, floats: np.ndarray,
                     ints: np.ndarray, grid: int, block: int) -> None:
        """Run ``radam_step_tensors<T>`` over separate (p, g, m, v) arrays through a pointer table."""
        from fastradam.backends.cuda import TILE, pack_tables
        from fastradam.layout import tiles

        pointers = np.array([[b.ctypes.data for b in quad] for quad in tensors], dtype=np.uint64).reshape(-1, 4)
        sizes = np.array([quad[0].size for quad in tensors], dtype=np.int64)
        table = tiles(np.zeros_like(sizes), sizes, TILE)
        packed, offsets = pack_tables(pointers, table, np.asarray(tensor_row, np.int32), floats, ints)
        pointers_at, tiles_at, rows_at, floats_at, ints_at = (
            ctypes.c_void_p(packed.ctypes.data + o) for o in offsets)
        self.lib.reset_counts()
        getattr(self.lib, f"radam_step_tensors_{floats.dtype.name}")(
            ctypes.c_uint(grid), ctypes.c_uint(block), pointers_at, tiles_at, ctypes.c_longlong(table.shape[0]),
            rows_at, floats_at, ints_at)

    def step_capturable(self, buffers: tuple[np.ndarray, ...], step: np.ndarray, lr: float | np.ndarray, *,
                        beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled_weight_decay: bool, maximize: bool, grid: int, block: int,
                        flavour: Flavour = PRESETS["torch"]) -> None:
        """Run ``radam_step_capturable<T, StepT, LrT>``: ``step`` (and an array ``lr``) read through pointers."""
        p = buffers[0]
        if isinstance(lr, np.ndarray):
            lr_name, lr_arg = lr.dtype.name, _pointer(lr)
        else:
            lr_name, lr_arg = "host", ctypes.c_double(lr)
        self.lib.reset_counts()
        getattr(self.lib, f"radam_step_capturable_{p.dtype.name}_{step.dtype.name}_{lr_name}")(
            ctypes.c_uint(grid), ctypes.c_uint(block), *map(_pointer, buffers), ctypes.c_longlong(p.size),
            _pointer(step), lr_arg, *map(ctypes.c_double, (beta1, beta2, eps, weight_decay)),
            ctypes.c_int(decoupled_weight_decay), ctypes.c_int(maximize), *_flavour_args(flavour))

    def step_scalars(self, *, step: float, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float, decoupled_weight_decay: bool, maximize: bool,
                     flavour: Flavour = PRESETS["torch"]) -> StepScalars:
        """``radam_step_scalars`` of radam.cuh, as a :class:`StepScalars`."""
        out = np.zeros(7, dtype=np.float64)
        flags = np.zeros(2, dtype=np.int32)
        self.lib.step_scalars(*map(ctypes.c_double, (step, lr, beta1, beta2, eps, weight_decay)),
                              ctypes.c_int(decoupled_weight_decay), ctypes.c_int(maximize),
                              *_flavour_args(flavour), _pointer(out), _pointer(flags))
        one_minus_beta1, beta2_, one_minus_beta2, eps_, l2, decay, step_size = map(float, out)
        return StepScalars(one_minus_beta1=one_minus_beta1, beta2=beta2_, one_minus_beta2=one_minus_beta2,
                           eps=eps_, l2_weight_decay=l2, param_decay=decay, step_size=step_size,
                           negate_grad=bool(flags[0]), mode=int(flags[1]))


def _flavour_args(flavour: Flavour) -> tuple:
    """The capturable kernel's flavour arguments, exactly as the backend makes them."""
    from fastradam.backends.cuda import flavour_arguments

    threshold, *flags = flavour_arguments(flavour)
    return (ctypes.c_double(threshold), *map(ctypes.c_int, flags))


# --- Cases shared by the host (harness) and GPU tests of the multi-tensor kernels -------------

#: Tensor sizes of the multi-tensor cases: empty, tiny, around the 16-byte lanes, the 64-element
#: layout alignment and the 4096-element tile.
MULTI_SIZES = (0, 1, 3, 63, 64, 65, 1000, 4099, 2, 17, 4096, 8193, 127, 129, 5, 0, 300, 4097, 15, 16,
               31, 33, 1, 255, 257, 511, 513, 4095, 64, 7, 8191, 2049, 100, 3, 65, 999, 128, 0, 12, 1025,
               4, 6, 8, 9, 10, 11, 62, 66, 4100, 2)


def scalars_for(hyper: dict) -> StepScalars:
    """:func:`fastradam.scalars.step_scalars` of a ``reference_step``-style ``hyper`` dict."""
    beta1, beta2 = hyper["betas"]
    return step_scalars(step=hyper["step"], lr=hyper["lr"], beta1=beta1, beta2=beta2, eps=hyper["eps"],
                        weight_decay=hyper["weight_decay"], decoupled_weight_decay=hyper["decoupled_weight_decay"],
                        maximize=hyper["maximize"], flavour=resolve_flavour(hyper.get("flavour", "torch")))


@dataclass
class MultiCase:
    """~50 tensors in two groups with different hyperparameters and steps, some skipped.

    Group 0 is below the flavour's threshold (MOMENTUM, or HOLD) with decoupled decay; group 1
    is rectified, with L2 decay and maximize. The tables hold a decoy row between the two, and
    group 0 uses the last row, so a kernel that confuses a tensor's group with its row fails.
    """

    flavour: Flavour
    sizes: tuple[int, ...] = MULTI_SIZES

    def __post_init__(self) -> None:
        count = len(self.sizes)
        self.groups = np.array([(i * 5 // 3) % 2 for i in range(count)], dtype=np.int64)
        self.skipped = np.array([i % 7 == 3 for i in range(count)])
        self.hypers = (
            dict(step=4, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                 maximize=False, flavour=self.flavour),
            dict(step=40, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05,
                 decoupled_weight_decay=False, maximize=True, flavour=self.flavour),
        )
        decoy = dict(self.hypers[1], step=1000, lr=0.5, maximize=False)
        self.rows = [scalars_for(self.hypers[1]), scalars_for(decoy), scalars_for(self.hypers[0])]
        row_of_group = np.array([2, 0], dtype=np.int32)
        self.index_row = np.where(self.skipped, -1, row_of_group[self.groups]).astype(np.int32)

    def tables(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """The (floats, ints) tables in ``dtype``, as the API packs them."""
        return pack_rows(self.rows, dtype)

    def hyper(self, i: int) -> dict:
        """The oracle's keyword arguments for tensor ``i``."""
        return self.hypers[int(self.groups[i])]

    def layout(self) -> FlatLayout:
        """A flat layout of the tensors, with their groups."""
        return FlatLayout([(n,) for n in self.sizes], groups=self.groups.tolist())

    def flat_values(self, layout: FlatLayout) -> list[np.ndarray]:
        """float64 (p, g, m, v) flat buffers of ``layout``: the tensors' values, NaN padding."""
        flat = [np.full(layout.size, np.nan) for _ in range(4)]
        for i, segment in enumerate(layout.segments):
            for buffer, value in zip(flat, self.random_values(i)):
                buffer[segment.offset:segment.offset + segment.size] = value
        return flat

    def check_segments(self, layout: FlatLayout, before: tuple, after: tuple) -> None:
        """Active segments match the oracle; skipped ones, the padding and the grads keep their bits."""
        untouched = np.ones(layout.size, dtype=bool)
        for i, segment in enumerate(layout.segments):
            if self.index_row[i] >= 0:
                where = slice(segment.offset, segment.offset + segment.size)
                untouched[where] = False
                assert_matches_oracle(tuple(b[where] for b in before), tuple(after[k][where] for k in (0, 2, 3)),
                                      self.hyper(i))
        for got, want in zip(after, before):
            np.testing.assert_array_equal(bits(got[untouched]), bits(want[untouched]))
        np.testing.assert_array_equal(bits(after[1]), bits(before[1]))

    def check_tensor(self, i: int, before: tuple, after: tuple, bases: tuple) -> None:
        """Tensor ``i`` (the view at ``bases[k]`` of allocation ``k``) matches the oracle when active;
        everything else in its allocations, and all of a skipped tensor's, keeps its bits."""
        n = self.sizes[i]
        if self.index_row[i] >= 0:
            assert_matches_oracle(tuple(r[b:b + n] for r, b in zip(before, bases)),
                                  tuple(after[k][bases[k]:bases[k] + n] for k in (0, 2, 3)), self.hyper(i))
            untouched = [np.r_[0:b, b + n:r.size] for r, b in zip(before, bases)]
        else:
            untouched = [np.arange(r.size) for r in before]
        for got, want, where in zip(after, before, untouched):
            np.testing.assert_array_equal(bits(got[where]), bits(want[where]))
        np.testing.assert_array_equal(bits(after[1]), bits(before[1]))

    def random_values(self, i: int) -> tuple[np.ndarray, ...]:
        """Fresh float64 (p, g, m, v) for tensor ``i``: nothing zero, v > 0."""
        rng = np.random.default_rng([i, self.sizes[i]])
        n = self.sizes[i]
        return (rng.standard_normal(n), rng.standard_normal(n), 0.1 * rng.standard_normal(n),
                1e-6 + 1e-2 * rng.random(n))


def bits(array: np.ndarray) -> np.ndarray:
    """The raw bits of a float array (NaN sentinels compare equal to themselves)."""
    return array.view(np.uint32 if array.dtype.itemsize == 4 else np.uint64)
