"""Storage formats, buffer roles, and which combinations of them a step supports: declared once.

Every backend, the tests, the benchmarks and the CUDA harness read :data:`FORMATS`,
:data:`ROLES` and :data:`SUPPORTED` instead of keeping lists of their own. Formats are
element-wise today (each value stands alone); a format's bit view is the integer dtype its
values cross to the kernels as when NumPy or CuPy has no arithmetic type for it.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StorageFormat:
    """How one buffer stores its values.

    ``bit_view`` is the dtype the kernels take the buffer as (16-bit floats as their bits:
    ``uint16`` holds bfloat16 bits, ``int16`` float16 bits, so the view's dtype tells the
    format apart); ``c_type`` is the kernels' C++ storage type; ``short`` names it in kernel
    and test ids.
    """

    name: str
    itemsize: int
    bit_view: str | None
    c_type: str
    short: str

    @property
    def view_dtype(self) -> np.dtype:
        """The dtype of the kernels' view of a buffer in this format."""
        return np.dtype(self.bit_view or self.name)


#: Every storage format, by name.
FORMATS: dict[str, StorageFormat] = {f.name: f for f in (
    StorageFormat("float32", 4, None, "float", "f32"),
    StorageFormat("float64", 8, None, "double", "f64"),
    StorageFormat("bfloat16", 2, "uint16", "fastradam::bfloat16_t", "bf16"),
    StorageFormat("float16", 2, "int16", "fastradam::float16_t", "f16"),
)}
SIXTEEN_BIT = ("bfloat16", "float16")
#: The format of each kernel view dtype (16-bit formats: their bit views).
FORMAT_OF_VIEW: dict[np.dtype, str] = {f.view_dtype: f.name for f in FORMATS.values()}


@dataclass(frozen=True)
class Role:
    """A buffer of a step: its argument name and whether the step writes it."""

    name: str
    written: bool


#: The four buffers of every step, in argument order.
ROLES: tuple[Role, ...] = (Role("params", True), Role("grads", False), Role("exp_avg", True),
                           Role("exp_avg_sq", True))
#: The optional fp32 master weights beside 16-bit params.
MASTER = Role("master_params", True)
#: The optional int16 remainders beside bfloat16 params (Transformer Engine's
#: ``store_param_remainders``): with the params they are the fp32 master, bit for bit (:data:`REMAINDER_DTYPE`).
REMAINDERS = Role("param_remainders", True)
BUFFER_NAMES = tuple(role.name for role in ROLES)
#: Whether a step writes each role, by name.
WRITTEN = {role.name: role.written for role in (*ROLES, MASTER, REMAINDERS)}
#: The dtype of a remainder buffer: the low 16 bits of each fp32 master value.
REMAINDER_DTYPE = np.dtype(np.int16)

SUPPORTED_STORAGE = (
    "float64 everywhere (math in float64); or params float32, bfloat16 or float16, grads float32, "
    "bfloat16 or float16, exp_avg and exp_avg_sq both float32 or both bfloat16, and float32 master "
    "weights only beside bfloat16/float16 params (math in float32); int16 param remainders or "
    "stochastic rounding only beside bfloat16 params, without a master, and not both"
)


@dataclass(frozen=True)
class Storage:
    """The storage of one step: the params, grads and moments formats, and how the params keep
    their fp32 values: an fp32 ``master`` beside them, int16 ``remainders`` beside bfloat16 params
    (the fp32 master split in two halves, :mod:`fastradam.rounding`), or neither, rounded to
    nearest-even, or, with ``stochastic``, rounded stochastically (bfloat16 params)."""

    params: str
    grads: str
    moments: str
    master: bool = False
    remainders: bool = False
    stochastic: bool = False

    @property
    def math_dtype(self) -> np.dtype:
        """float64 only when everything is float64; float32 otherwise."""
        return np.dtype(np.float64 if self.params == "float64" else np.float32)

    @property
    def step_bytes(self) -> int:
        """Bytes one step moves per element (the benchmarks' traffic): it reads g, m, v and p (the
        master instead of p when there is one) and writes p, m, v (and the master)."""
        params, grads, moments = (FORMATS[f].itemsize for f in (self.params, self.grads, self.moments))
        master = FORMATS["float32"].itemsize
        remainders = 2 * REMAINDER_DTYPE.itemsize if self.remainders else 0
        return params + (2 * master if self.master else params) + remainders + grads + 4 * moments

    @property
    def short(self) -> str:
        """An id such as ``bf16_bf16_f32_master``."""
        names = "_".join(FORMATS[f].short for f in (self.params, self.grads, self.moments))
        return names + ("_master" if self.master else "_rem" if self.remainders else "_sr" if self.stochastic else "")


def _refusal(names: tuple[str, ...], storages: tuple[str, ...], master: str | None,
             master_name: str, remainders: str | None = None, stochastic: bool = False) -> str | None:
    """Why buffers stored as ``storages`` (and ``master``, ``remainders``, with ``stochastic``
    rounding) cannot be stepped, or None: the rule."""
    if remainders is not None or stochastic:
        what = REMAINDERS.name if remainders is not None else "stochastic rounding"
        if storages[0] != "bfloat16":
            return f"{what} is for bfloat16 params, but {names[0]} is {storages[0]}"
        if master is not None:
            return f"{what} replaces {master_name}: pass one of them"
        if remainders is not None and stochastic:
            return f"stochastic rounding and {REMAINDERS.name} exclude each other (the remainders keep the exact value)"
        if remainders is not None and remainders != REMAINDER_DTYPE.name:
            return f"{REMAINDERS.name} must be int16 (the low 16 bits of the fp32 master), got {remainders}"
    for name, storage in zip((*names, master_name), (*storages, master)):
        if storage is not None and storage not in FORMATS:
            return f"{name} must have dtype float32, float64, bfloat16 or float16, got {storage}"
    params, _, exp_avg, exp_avg_sq = storages
    if "float64" in storages:
        wide = storages.index("float64")
        for name, storage in zip(names, storages):
            if storage != "float64":
                return f"{name} has dtype {storage} but {names[wide]} is float64: float64 storage is all-float64"
        if master is not None:
            return f"{master_name} goes with bfloat16/float16 params, not with float64 ones"
        return None
    if exp_avg_sq != exp_avg:
        return f"{names[3]} has dtype {exp_avg_sq} but {names[2]} has {exp_avg}: the moments share one dtype"
    if exp_avg not in ("float32", "bfloat16"):
        return f"{names[2]} must be float32 or bfloat16, got {exp_avg}"
    if master is not None and params not in SIXTEEN_BIT:
        return f"{master_name} is for bfloat16/float16 params, but {names[0]} is {params}"
    if master is not None and master != "float32":
        return f"{master_name} must be float32, got {master}"
    return None


@functools.lru_cache(maxsize=256)
def check_storage(storages: tuple[str, ...], names: tuple[str, ...] = BUFFER_NAMES, master: str | None = None,
                  master_name: str = MASTER.name, remainders: str | None = None,
                  stochastic: bool = False) -> Storage:
    """The :class:`Storage` of buffers stored as ``storages`` (params, grads, exp_avg, exp_avg_sq
    format names), an optional master or remainder buffer (its dtype's name) and the rounding;
    TypeError naming the buffer and listing what works."""
    reason = _refusal(tuple(names), tuple(storages), master, master_name, remainders, stochastic)
    if reason is not None:
        raise TypeError(f"{reason}; supported storage: {SUPPORTED_STORAGE}")
    return Storage(storages[0], storages[1], storages[2], master is not None, remainders is not None, stochastic)


#: How params keep their values: ``(master, remainders, stochastic)`` of a :class:`Storage`.
_PARAM_KEEPING = ((False, False, False), (True, False, False), (False, True, False), (False, False, True))

#: Every storage combination a step supports (43), in a fixed order: the kernels are
#: instantiated for these, and every backend's tests run them.
SUPPORTED: tuple[Storage, ...] = tuple(
    Storage(params, grads, moments, *keeping)
    for params, grads, moments, keeping in itertools.product(FORMATS, FORMATS, FORMATS, _PARAM_KEEPING)
    if _refusal(BUFFER_NAMES, (params, grads, moments, moments), "float32" if keeping[0] else None, MASTER.name,
                REMAINDER_DTYPE.name if keeping[1] else None, keeping[2]) is None
)
