"""The CPU harness of the CUDA kernels: kernels/radam.cu built by g++ with kernels/host_shim.h.

The very file CuPy compiles is built into a shared library (cached in the temp folder by a
hash of the sources and flags) and driven through ctypes on NumPy arrays, so the kernels'
element math, scalar folding, grid-stride indexing and head/vector/tail split run on the CPU.
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

from fastradam.scalars import StepScalars

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

    def step(self, buffers: tuple[np.ndarray, ...], scalars: StepScalars, grid: int, block: int) -> None:
        """Run ``radam_step<T>`` with the host scalars rounded to the buffers' dtype."""
        p, g, m, v = buffers
        c_type = _C_TYPES[p.dtype]
        values = (scalars.one_minus_beta1, scalars.beta2, scalars.one_minus_beta2, scalars.eps,
                  scalars.l2_weight_decay, scalars.param_decay, scalars.step_size)
        self.lib.reset_counts()
        getattr(self.lib, f"radam_step_{p.dtype.name}")(
            ctypes.c_uint(grid), ctypes.c_uint(block), *map(_pointer, buffers), ctypes.c_longlong(p.size),
            *(c_type(p.dtype.type(x)) for x in values),
            ctypes.c_int(scalars.negate_grad), ctypes.c_int(scalars.rectified))

    def step_capturable(self, buffers: tuple[np.ndarray, ...], step: np.ndarray, lr: float | np.ndarray, *,
                        beta1: float, beta2: float, eps: float, weight_decay: float,
                        decoupled_weight_decay: bool, maximize: bool, grid: int, block: int) -> None:
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
            ctypes.c_int(decoupled_weight_decay), ctypes.c_int(maximize))

    def step_scalars(self, *, step: float, lr: float, beta1: float, beta2: float, eps: float,
                     weight_decay: float, decoupled_weight_decay: bool, maximize: bool) -> StepScalars:
        """``radam_step_scalars`` of radam.cuh, as a :class:`StepScalars`."""
        out = np.zeros(7, dtype=np.float64)
        flags = np.zeros(2, dtype=np.int32)
        self.lib.step_scalars(*map(ctypes.c_double, (step, lr, beta1, beta2, eps, weight_decay)),
                              ctypes.c_int(decoupled_weight_decay), ctypes.c_int(maximize),
                              _pointer(out), _pointer(flags))
        one_minus_beta1, beta2_, one_minus_beta2, eps_, l2, decay, step_size = map(float, out)
        return StepScalars(beta2=beta2_, one_minus_beta1=one_minus_beta1, one_minus_beta2=one_minus_beta2,
                           eps=eps_, l2_weight_decay=l2, param_decay=decay,
                           negate_grad=bool(flags[0]), rectified=bool(flags[1]), step_size=step_size)
