"""The CPU harness of the CUDA kernels: kernels/radam.cu built by g++ with kernels/host_shim.h.

The very file CuPy compiles is built into a shared library (cached in the temp folder by a
hash of the sources and flags) and driven through ctypes on NumPy arrays, so the kernels'
element math, scalar folding, grid-stride indexing, tile tables and head/vector/tail split run
on the CPU. The multi-tensor calls take their tables from the CUDA backend's own host-side
builders (``fastradam.layout.tiles``, ``pack_tables``), so those are checked too.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastradam.backends.cuda import TILE, launch
from fastradam.backends.cuda import module as cuda_module
from fastradam.backends.cuda.tables import pack_tables, table_views
from fastradam.layout import index_shifts
from fastradam.clipping import Clip
from fastradam.flavours import PRESETS, Flavour, resolve_flavour
from fastradam.layout import FlatLayout, tiles
from fastradam.options import check_group
from fastradam.scalars import StepScalars, pack_rows, step_scalars
from fastradam.spec import DTYPE_CODES, SCALAR_FLOATS
from fastradam.rounding import round_key
from fastradam.storage import FORMATS, REMAINDER_DTYPE, SUPPORTED, Storage, check_storage
from oracle_check import assert_matches_oracle

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
HARNESS = Path(__file__).with_name("cuda_harness.cpp")
SOURCES = (KERNELS / "radam.cu", KERNELS / "radam.cuh", KERNELS / "generated" / "abi.cuh", KERNELS / "host_shim.h",
           HARNESS)
#: Warnings are errors; no FMA contraction (as the GPU build's --fmad=false); the shim's 16-byte
#: pack loads alias float/double storage.
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing",
         "-Wall", "-Wextra", "-Werror")


def storage_of(params: np.ndarray, grads: np.ndarray, exp_avg: np.ndarray, master: np.ndarray | None,
               stochastic: bool = False) -> Storage:
    """The :class:`~fastradam.storage.Storage` of NumPy buffers (bfloat16: ml_dtypes'), as a step checks it:
    ``master`` the fp32 master or, int16, the remainders."""
    remainders = master is not None and master.dtype == REMAINDER_DTYPE
    return check_storage((params.dtype.name, grads.dtype.name, exp_avg.dtype.name, exp_avg.dtype.name),
                         master=None if master is None or remainders else master.dtype.name,
                         remainders=REMAINDER_DTYPE.name if remainders else None, stochastic=stochastic)


def math_dtype(params: np.ndarray) -> np.dtype:
    return np.dtype(np.float64 if params.dtype == np.float64 else np.float32)


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


def _pointer(array: np.ndarray | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if array is None else array.ctypes.data)


def _packed(arguments: tuple) -> tuple[ctypes.Array, list]:
    """``arguments`` (as ``fastradam.backends.cuda.launch`` builds them) the way cuLaunchKernel takes
    them: an array of pointers, entry i at the value of parameter i. A NumPy array is a pointer
    parameter (its address is the value); a NumPy scalar or record is passed by value (its bytes).
    Returns the array and what keeps the values alive."""
    values: list = []
    for argument in arguments:
        if isinstance(argument, np.ndarray):
            values.append(ctypes.c_void_p(argument.ctypes.data))
        elif isinstance(argument, np.generic):
            values.append(np.array(argument))  # a 0-d copy: its bytes are the value
        else:
            raise TypeError(f"a kernel argument must be a NumPy array or scalar, got {type(argument).__name__}")
    addresses = [ctypes.addressof(v) if isinstance(v, ctypes.c_void_p) else v.ctypes.data for v in values]
    return (ctypes.c_void_p * len(values))(*addresses), values


def _flag(found_inf: np.ndarray | None) -> launch.Value:
    """``skip, skip_code`` of a host 0-d flag array (None: no flag), as the backend makes a device flag's."""
    if found_inf is None:
        return launch.NO_FLAG
    return found_inf, np.int32(DTYPE_CODES[found_inf.dtype])


class NormScratch:
    """The clipping pre-pass's memory for a grid of ``grid`` blocks of ``block`` threads (T), as
    ``prepass.NormScratch`` holds it on a device: 2 T float64 values, a partial per thread then the
    levels of the reduction tree (NaN: a read of an unwritten one shows), T uint32 arrival counters
    (zero), and the outputs (NaN, -1: unwritten): the norm, the factor and the update's flag."""

    def __init__(self, grid: int, block: int) -> None:
        self.partials = np.full(2 * grid * block, np.nan)
        self.counters = np.zeros(grid * block, dtype=np.uint32)
        self.norm = np.full((), np.nan)
        self.factor = np.full((), np.nan)
        self.flag = np.full((), -1, dtype=np.int32)


def _tables(*tables: np.ndarray) -> list[np.ndarray]:
    """``tables`` packed into one buffer and viewed back, as the backend uploads them (the host bytes here)."""
    packed, offsets = pack_tables(*tables)
    return table_views(packed, offsets, tables)


@dataclass
class Harness:
    """Calls into the harness library, with the CUDA backend's own argument lists
    (:mod:`fastradam.backends.cuda.launch`) and table packing. Every step takes ``master``
    (fp32 master weights beside 16-bit params, or int16 remainders beside bfloat16 params; in a
    tensor list, the fifth array of each tensor), ``stochastic`` (bfloat16 params rounded
    stochastically; not the capturable kernels), ``found_inf`` (a 0-d host array read by the
    kernel, as a device flag would be), ``check_finite`` (the read-only pre-pass first, its
    flag then skipping the update) and ``clip`` (:class:`fastradam.clipping.Clip`: the clipping
    pre-pass first, its factor and flag then read by the update; the step returns the norm), as the
    CUDA backend launches them."""

    lib: ctypes.CDLL

    def counts(self) -> tuple[int, int]:
        """Elements updated by packs and one at a time since the last launch began."""
        out = np.zeros(2, dtype=np.int64)
        self.lib.read_counts(_pointer(out))
        return int(out[0]), int(out[1])

    def launch(self, kernel: str, suffix: str, grid: int, block: int, arguments: tuple) -> None:
        """Run ``kernel`` (e.g. ``radam_step_segments``) of storage ``suffix`` with ``arguments``."""
        packed, _alive = _packed(arguments)
        getattr(self.lib, f"launch_{kernel}_{suffix}")(ctypes.c_uint(grid), ctypes.c_uint(block), packed)

    def _gate(self, kind: str, grads_storage: str, found_inf, check_finite: bool, grid: int, block: int,
              arguments, clip: Clip | None = None, norm_launch: tuple[int, int] | None = None,
              work: int = 0) -> tuple[launch.Value | None, np.ndarray | None, np.ndarray | None]:
        """The update's ``skip, skip_code`` (None: no update), device factor (None: the tables') and
        norm (None without ``clip``), as ``fastradam.backends.cuda.prepass.gate`` makes them: found_inf,
        or the check_finite pre-pass's flag, or the clipping pre-pass (``arguments(skip, flag, norm)``
        builds the pre-pass's argument list; ``norm_launch`` its (grid, block), by default the backend's:
        ``norm_grid`` of ``work`` elements for "flat", ``norm_tile_grid`` of ``work`` tiles else, and
        BLOCK). The clipping pre-pass's scratch stays in ``self.scratch`` (its counters must be left zero)."""
        skip = _flag(found_inf)
        suffix = FORMATS[grads_storage].short
        if clip is None:
            if not check_finite:
                return skip, None, None
            self.flag = np.zeros((), dtype=np.int32)
            self.launch(f"prepass_{kind}", suffix, grid, block, arguments(skip, self.flag))
            return (self.flag, np.int32(DTYPE_CODES[self.flag.dtype])), None, None
        if norm_launch is None:
            lanes = 16 // FORMATS[grads_storage].itemsize
            norm_launch = (cuda_module.norm_grid(work, lanes) if kind == "flat" else cuda_module.norm_tile_grid(work),
                           cuda_module.BLOCK)
        norm_grid, norm_block = norm_launch
        self.scratch = scratch = NormScratch(norm_grid, norm_block)
        if clip.norm is None:
            request = launch.norm_request(clip, partials=scratch.partials, counters=scratch.counters,
                                          norm=scratch.norm, factor=scratch.factor, check_finite=check_finite)
            self.launch(f"prepass_{kind}", suffix, norm_grid, norm_block, arguments(skip, scratch.flag, request))
        else:
            given = clip.norm if isinstance(clip.norm, np.ndarray) else np.array(float(clip.norm))
            request = launch.norm_request(clip, given=launch.given_norm(given), norm=scratch.norm,
                                          factor=scratch.factor, check_finite=check_finite)
            self.launch("prepass_flat", suffix, 1, 1, launch.prepass_flat(None, 0, skip, scratch.flag, request))
        if clip.max_norm is None:
            return None, None, scratch.norm
        return (scratch.flag, np.int32(DTYPE_CODES[scratch.flag.dtype])), scratch.factor, scratch.norm

    def step(self, buffers: tuple[np.ndarray, ...], floats: np.ndarray, ints: np.ndarray, grid: int,
             block: int, *, master: np.ndarray | None = None, stochastic: bool = False,
             found_inf: np.ndarray | None = None, check_finite: bool = False, clip: Clip | None = None,
             norm_launch: tuple[int, int] | None = None) -> float | None:
        """Run ``radam_step<P, G, Mo, K>`` with row 0 of the host tables (``pack_rows``) as its record;
        with ``clip``, after the clipping pre-pass, returning its norm."""
        p, g, m, v = buffers
        storage = storage_of(p, g, m, master, stochastic)
        scalars = launch.scalars_record(np.asarray(floats, dtype=storage.math_dtype), np.asarray(ints, np.int32))
        self.lib.reset_counts()
        skip, factor, norm = self._gate("flat", storage.grads, found_inf, check_finite, grid, block,
                                        functools.partial(launch.prepass_flat, g, g.size), clip, norm_launch, g.size)
        if skip is not None:
            self.launch("radam_step", storage.short, grid, block,
                        launch.step(buffers, master, p.size, scalars, skip, factor))
        return None if norm is None else float(norm)

    def step_segments(self, buffers: tuple[np.ndarray, ...], segments, segment_row: np.ndarray,
                      floats: np.ndarray, ints: np.ndarray, grid: int, block: int, *,
                      master: np.ndarray | None = None, stochastic: bool = False,
                      found_inf: np.ndarray | None = None, check_finite: bool = False, clip: Clip | None = None,
                      norm_launch: tuple[int, int] | None = None) -> float | None:
        """Run ``radam_step_segments`` over ``segments`` (a ``SegmentArrays``), tables as the backend makes them."""
        p, g, m, v = buffers
        storage = storage_of(p, g, m, master, stochastic)
        table = tiles(segments.offsets, segments.sizes, TILE)
        tiles_t, rows, floats_t, ints_t, *shifts = _tables(
            table, np.asarray(segment_row, np.int32), np.asarray(floats, dtype=storage.math_dtype),
            np.asarray(ints, np.int32), *((index_shifts(segments.offsets, segments.sizes),) if stochastic else ()))
        n_tiles = table.shape[0]
        self.lib.reset_counts()
        skip, factor, norm = self._gate("segments", storage.grads, found_inf, check_finite, grid, block,
                                        functools.partial(launch.prepass_segments, g, tiles_t, n_tiles, rows), clip,
                                        norm_launch, n_tiles)
        if skip is not None:
            self.launch("radam_step_segments", storage.short, grid, block,
                        launch.segments(buffers, master, tiles_t, n_tiles, rows, floats_t, ints_t,
                                        shifts[0] if shifts else None, skip, factor))
        return None if norm is None else float(norm)

    def step_tensors(self, tensors: list[tuple[np.ndarray, ...]], tensor_row: np.ndarray, floats: np.ndarray,
                     ints: np.ndarray, grid: int, block: int, *, stochastic: bool = False,
                     found_inf: np.ndarray | None = None, check_finite: bool = False, clip: Clip | None = None,
                     norm_launch: tuple[int, int] | None = None) -> float | None:
        """Run ``radam_step_tensors`` over separate (p, g, m, v[, master or remainders]) arrays through a
        pointer table."""
        columns = len(tensors[0])
        first = tensors[0]
        storage = storage_of(first[0], first[1], first[2], first[4] if columns == 5 else None, stochastic)
        pointers = np.array([[b.ctypes.data for b in quad] for quad in tensors], dtype=np.uint64).reshape(-1, columns)
        sizes = np.array([quad[0].size for quad in tensors], dtype=np.int64)
        table = tiles(np.zeros_like(sizes), sizes, TILE)
        pointers_t, tiles_t, rows, floats_t, ints_t, *shifts = _tables(
            pointers, table, np.asarray(tensor_row, np.int32), np.asarray(floats, dtype=storage.math_dtype),
            np.asarray(ints, np.int32), *((index_shifts(np.zeros_like(sizes), sizes),) if stochastic else ()))
        n_tiles = table.shape[0]
        self.lib.reset_counts()
        skip, factor, norm = self._gate(
            "tensors", storage.grads, found_inf, check_finite, grid, block,
            functools.partial(launch.prepass_tensors, pointers_t, columns, tiles_t, n_tiles, rows), clip,
            norm_launch, n_tiles)
        if skip is not None:
            self.launch("radam_step_tensors", storage.short, grid, block,
                        launch.tensors(pointers_t, tiles_t, n_tiles, rows, floats_t, ints_t,
                                       shifts[0] if shifts else None, skip, factor))
        return None if norm is None else float(norm)

    def step_segments_capturable(self, buffers: tuple[np.ndarray, ...], segments, segment_group: np.ndarray,
                                 steps: np.ndarray, groups: list, lrs: list, grid: int, block: int, *,
                                 master: np.ndarray | None = None, grad_scale: float = 1.0,
                                 found_inf: np.ndarray | None = None, check_finite: bool = False,
                                 clip: Clip | None = None) -> float | None:
        """Run ``radam_step_segments_capturable``: each segment's step count (``steps``) and group row
        read by the kernel; ``lrs[k]`` a float or a 0-d array read through its address."""
        p, g, m, v = buffers
        storage = storage_of(p, g, m, master)
        refs = [(lr.ctypes.data, DTYPE_CODES[lr.dtype]) if isinstance(lr, np.ndarray) else lr for lr in lrs]
        floats, ints, pointers = launch.group_tables(groups, refs, grad_scale)
        table = tiles(segments.offsets, segments.sizes, TILE)
        tiles_t, rows, floats_t, ints_t, pointers_t = _tables(table, np.asarray(segment_group, np.int32), floats,
                                                              ints, pointers)
        n_tiles = table.shape[0]
        self.lib.reset_counts()
        skip, factor, norm = self._gate("segments", storage.grads, found_inf, check_finite, grid, block,
                                        functools.partial(launch.prepass_segments, g, tiles_t, n_tiles, rows), clip,
                                        None, n_tiles)
        if skip is not None:
            self.launch("radam_step_segments_capturable", storage.short, grid, block,
                        launch.segments_capturable(buffers, master, tiles_t, n_tiles, rows,
                                                   (steps, np.int32(DTYPE_CODES[steps.dtype])), floats_t, ints_t,
                                                   pointers_t, skip, factor))
        return None if norm is None else float(norm)

    def step_capturable(self, buffers: tuple[np.ndarray, ...], step: np.ndarray, lr: float | np.ndarray, *,
                        beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled_weight_decay: bool, maximize: bool, grid: int, block: int,
                        flavour: Flavour = PRESETS["torch"], eps_root: float = 0.0,
                        master: np.ndarray | None = None, grad_scale: float = 1.0,
                        found_inf: np.ndarray | None = None, check_finite: bool = False,
                        clip: Clip | None = None) -> float | None:
        """Run ``radam_step_capturable``: ``step`` (and an array ``lr``) read through pointers and type codes."""
        p, g, m, v = buffers
        storage = storage_of(p, g, m, master)
        group = _group(beta1, beta2, eps, eps_root, weight_decay, decoupled_weight_decay, maximize, flavour)
        lr_ref = (lr.ctypes.data, DTYPE_CODES[lr.dtype]) if isinstance(lr, np.ndarray) else lr
        record, lr_address = launch.group_record(group, lr_ref, grad_scale)
        self.lib.reset_counts()
        skip, factor, norm = self._gate("flat", storage.grads, found_inf, check_finite, grid, block,
                                        functools.partial(launch.prepass_flat, g, g.size), clip, None, g.size)
        if skip is not None:
            self.launch("radam_step_capturable", storage.short, grid, block,
                        launch.capturable(buffers, master, p.size, (step, np.int32(DTYPE_CODES[step.dtype])),
                                          lr_address, record, skip, factor))
        return None if norm is None else float(norm)

    def step_scalars(self, *, step: float, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float, decoupled_weight_decay: bool, maximize: bool,
                     flavour: Flavour = PRESETS["torch"], eps_root: float = 0.0) -> StepScalars:
        """``radam_step_scalars`` of radam.cuh, as a :class:`StepScalars` (its inv_grad_scale is 1)."""
        group = _group(beta1, beta2, eps, eps_root, weight_decay, decoupled_weight_decay, maximize, flavour)
        record, _ = launch.group_record(group, lr, 1.0)
        row = np.array(record)
        out = np.zeros((), dtype=launch.scalars_dtype(np.dtype(np.float64)))
        self.lib.step_scalars(ctypes.c_double(step), ctypes.c_double(lr), _pointer(row), _pointer(out))
        assert float(out["inv_grad_scale"]) == 1.0
        return StepScalars(**{name: float(out[name]) for name in SCALAR_FLOATS[:-1]},
                           negate_grad=bool(out["negate_grad"]), mode=int(out["mode"]))

    def split_remainders(self, master: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """radam.cuh's split of fp32 masters into (bfloat16 bits ``uint16``, int16 remainders)."""
        master = np.ascontiguousarray(master, dtype=np.float32)
        high, low = np.empty(master.size, np.uint16), np.empty(master.size, np.int16)
        self.lib.split_remainders(_pointer(master), _pointer(high), _pointer(low), ctypes.c_longlong(master.size))
        return high, low

    def join_remainders(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        """radam.cuh's join of bfloat16 bits and int16 remainders into fp32 masters."""
        high, low = np.ascontiguousarray(high, np.uint16), np.ascontiguousarray(low, np.int16)
        out = np.empty(high.size, np.float32)
        self.lib.join_remainders(_pointer(high), _pointer(low), _pointer(out), ctypes.c_longlong(high.size))
        return out

    def stochastic_round(self, values: np.ndarray, index: np.ndarray, key: tuple[int, int]) -> np.ndarray:
        """radam.cuh's stochastic rounding of fp32 ``values`` at global indices ``index`` under ``key``
        (``round_key_lo, round_key_hi``: :func:`fastradam.rounding.round_key`), as bfloat16 bits."""
        values, index = np.ascontiguousarray(values, np.float32), np.ascontiguousarray(index, np.int64)
        out = np.empty(values.size, np.uint16)
        self.lib.stochastic_round(_pointer(values), _pointer(index), ctypes.c_int(key[0]), ctypes.c_int(key[1]),
                                  _pointer(out), ctypes.c_longlong(values.size))
        return out

    def convert(self, name: str, values: np.ndarray) -> np.ndarray:
        """radam.cuh's conversion ``name`` (``bfloat16_to_float``, ``float_to_float16``, ...) over ``values``."""
        values = np.ascontiguousarray(values)
        out = np.empty(values.size, dtype=np.float32 if name.endswith("_to_float") else np.uint16)
        getattr(self.lib, name)(_pointer(values), _pointer(out), ctypes.c_longlong(values.size))
        return out


def _group(beta1: float, beta2: float, eps: float, eps_root: float, weight_decay: float, decoupled: bool,
           maximize: bool, flavour: Flavour):
    """Validated options of these hyperparameters (the lr is passed on its own)."""
    return check_group({"betas": (beta1, beta2), "eps": eps, "eps_root": eps_root, "weight_decay": weight_decay,
                        "decoupled_weight_decay": decoupled, "maximize": maximize, "flavour": flavour})


# --- Cases shared by the host (harness) and GPU tests of the multi-tensor kernels -------------

#: Tensor sizes of the multi-tensor cases: empty, tiny, around the 16-byte lanes, the 64-element
#: layout alignment and the 4096-element tile.
MULTI_SIZES = (0, 1, 3, 63, 64, 65, 1000, 4099, 2, 17, 4096, 8193, 127, 129, 5, 0, 300, 4097, 15, 16,
               31, 33, 1, 255, 257, 511, 513, 4095, 64, 7, 8191, 2049, 100, 3, 65, 999, 128, 0, 12, 1025,
               4, 6, 8, 9, 10, 11, 62, 66, 4100, 2)


#: The 12 storage combinations without an fp32 master that keep bfloat16 params exact (int16
#: remainders) or round them stochastically; the seed their stochastic tests round with.
KEEPING = tuple(s for s in SUPPORTED if s.remainders or s.stochastic)
SEED = 0x0123_4567_89AB_CDEF


def keeping_tables(rows: list[tuple[StepScalars, int]], storage: Storage,
                   grad_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``pack_rows`` (float32) of ``(scalars, step)`` rows, each with the stochastic-rounding key of
    SEED and its step when ``storage`` rounds so (as a plan folds it)."""
    keys = [round_key(SEED, step) if storage.stochastic else (0, 0) for _, step in rows]
    return pack_rows([r._replace(round_key_lo=lo, round_key_hi=hi) for (r, _), (lo, hi) in zip(rows, keys)],
                     np.float32, grad_scale)


def scalars_for(hyper: dict) -> StepScalars:
    """:func:`fastradam.scalars.step_scalars` of a ``reference_step``-style ``hyper`` dict."""
    beta1, beta2 = hyper["betas"]
    return step_scalars(step=hyper["step"], lr=hyper["lr"], beta1=beta1, beta2=beta2, eps=hyper["eps"],
                        weight_decay=hyper["weight_decay"], decoupled_weight_decay=hyper["decoupled_weight_decay"],
                        maximize=hyper["maximize"], flavour=resolve_flavour(hyper.get("flavour", "torch")),
                        eps_root=hyper.get("eps_root", 0.0))


@dataclass
class MultiCase:
    """~50 tensors in two groups with different hyperparameters and steps, some skipped.

    Group 0 is below the flavour's threshold (MOMENTUM, or HOLD) with decoupled decay; group 1
    is rectified, with L2 decay, maximize and an eps_root. The tables hold a decoy row between the two, and
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
            dict(step=40, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, eps_root=1e-7, weight_decay=0.05,
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
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.dtype.itemsize])


def capturable_step(backend, *arguments, beta1: float, beta2: float, eps: float, weight_decay: float,
                    decoupled_weight_decay: bool, maximize: bool, flavour: Flavour = PRESETS["torch"],
                    eps_root: float = 0.0, **keywords) -> None:
    """``backend.radam_step_capturable(p, g, m, v, step, lr, group, ...)`` with the group's options
    given as keywords (the GPU tests' form): ``arguments`` are the buffers, the step and the lr."""
    group = _group(beta1, beta2, eps, eps_root, weight_decay, decoupled_weight_decay, maximize, flavour)
    *buffers, step, lr = arguments
    backend.radam_step_capturable(*buffers, step, lr, group, **keywords)
