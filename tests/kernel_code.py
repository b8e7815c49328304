"""What the Numba kernels compile to, for tests that read code generation rather than results.

The kernels' own sources are compiled afresh (cached code cannot be inspected) for explicit
signatures, without running them, so a process may compile for another CPU than the one it
runs on (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``). ``python -m tests.kernel_code
[STORAGE ...]`` prints :func:`summary` as JSON, for the tests that compile for CPUs other than
this one.
"""

from __future__ import annotations

import json
import re
import sys

import numba
import numpy as np

from fastradam.backends.numba import bf16_lanes, kernels as numba_kernels, target as numba_target
from fastradam.scalars import pack_rows, step_scalars

#: Bit-view dtypes of (params, grads, moments, master) per storage the tests inspect; the master
#: int16 for remainders, "stochastic" for stochastic rounding (no master, a block index table).
STORAGES = {
    "float32": (np.float32, np.float32, np.float32, None),
    "bf16-params-grads": (np.uint16, np.uint16, np.float32, None),  # bfloat16 params and grads, fp32 moments
    "fp16-master-bf16-moments": (np.int16, np.int16, np.uint16, np.float32),  # fp16 params + master, bf16 moments
    "all-bfloat16": (np.uint16, np.uint16, np.uint16, None),
    "bf16-params-grads-remainders": (np.uint16, np.uint16, np.float32, np.int16),
    "bf16-params-grads-stochastic": (np.uint16, np.uint16, np.float32, "stochastic"),
    "all-bfloat16-remainders": (np.uint16, np.uint16, np.uint16, np.int16),
    "all-bfloat16-stochastic": (np.uint16, np.uint16, np.uint16, "stochastic"),
}
#: Register letter of each vector width in x86 assembly.
REGISTER = {128: "x", 256: "y", 512: "z"}


def compiled(storage: str) -> tuple[str, str]:
    """``(llvm_ir, asm)`` of the flat-buffer kernel compiled afresh for ``storage``."""
    kernel = numba.njit(parallel=True)(numba_kernels._radam_blocks.py_func)
    scalars = step_scalars(step=6, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                           decoupled_weight_decay=False, maximize=False)
    floats, ints = pack_rows([scalars], np.dtype(np.float32))
    p, g, m, master = STORAGES[storage]
    stochastic = isinstance(master, str)
    args = (np.empty(8, p), np.empty(8, g), np.empty(8, m), np.empty(8, m),
            None if master is None or stochastic else np.empty(8, master), np.array([0]), np.array([8]),
            np.array([0], np.int32), np.array([0]) if stochastic else None,  # block_index: each block's global index
            floats, ints, False)
    signature = tuple(numba.typeof(a) for a in args)
    kernel.compile(signature)
    return kernel.inspect_llvm(signature), kernel.inspect_asm(signature)


def packed_sqrt_widths(ir: str, asm: str) -> tuple[list[int], list[str]]:
    """The lane counts of the float32 vector square roots in the IR, and the x86 register letters
    (``x``/``y``/``z``) of the packed single-precision square roots in the assembly."""
    lanes = sorted({int(n) for n in re.findall(r"@llvm\.sqrt\.(?:nx)?v(\d+)f32", ir)})  # nxv: scalable (SVE)
    registers = sorted(set(re.findall(r"\bv?sqrtps\s+[^\n]*?%([xyz])mm", asm)))
    return lanes, registers


def promoted_to_float64(ir: str) -> bool:
    """Whether the IR does any float64 arithmetic: an extension to double or a double square root."""
    vector = r"(<(vscale x )?\d+ x )?"
    return bool(re.search(rf"fpext {vector}float|@llvm\.sqrt\.((nx)?v\d+)?f64|f(add|mul|sub|div) {vector}double", ir))


def summary(storages: list[str] | None = None) -> dict:
    """For each storage (default: all): packed-sqrt lanes and registers, float64 promotion, the bf16 conversions
    (``vcvtne2ps2bf16``) and class tests (``vfpclassps``) of the explicit AVX-512 loop; and what
    the CPU compiled for offers."""
    out = {"widest_vector_bits": numba_target.widest_vector_bits(), "lanes_available": bf16_lanes.available()}
    for storage in STORAGES if storages is None else storages:
        ir, asm = compiled(storage)
        lanes, registers = packed_sqrt_widths(ir, asm)
        out[storage] = {"sqrt_lanes": lanes, "sqrt_registers": registers, "float64": promoted_to_float64(ir),
                        "bf16_conversions": len(re.findall(r"vcvtne2ps2bf16", asm)),
                        "class_tests": len(re.findall(r"vfpclassps", asm))}
    return out


if __name__ == "__main__":
    print(json.dumps(summary(sys.argv[1:] or None)))
