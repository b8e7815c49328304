"""Every argument check of the step functions, in one place, run before any byte is written.

Buffer checks read only the array-interface protocols (``__array_interface__`` for host
arrays, ``__cuda_array_interface__`` for device arrays), so they are the same for every
backend and need no backend import. Errors are TypeError (wrong kind of thing) or
ValueError (right kind, wrong value), and name the argument.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fastradam.flavours import Flavour, resolve_flavour
from fastradam.schedules import KerasWarmup

#: Storage formats (dtype names) a buffer may have; which combinations work: :func:`check_storage`.
STORAGE_FORMATS = ("float32", "float64", "bfloat16", "float16")
SIXTEEN_BIT = ("bfloat16", "float16")
SUPPORTED_STORAGE = (
    "float64 everywhere (math in float64); or params float32, bfloat16 or float16, grads float32, "
    "bfloat16 or float16, exp_avg and exp_avg_sq both float32 or both bfloat16, and float32 master "
    "weights only beside bfloat16/float16 params (math in float32)"
)

#: The largest step: beyond 2**53 a step is no longer an exact float64 in the scalars.
MAX_STEP = 2**53

BUFFER_NAMES = ("params", "grads", "exp_avg", "exp_avg_sq")
#: Which of the four buffers a step writes; ``grads`` is only read.
WRITTEN = (True, False, True, True)

#: Every option a group (or ``fused_step``) takes besides the step, with its default.
GROUP_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "decoupled_weight_decay": False,
    "maximize": False,
    "flavour": "torch",
    "schedule": None,
}


@dataclass(frozen=True)
class GroupHyperparameters:
    """Validated hyperparameters of one parameter group (everything but the step)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    maximize: bool
    flavour: Flavour
    schedule: KerasWarmup | None


def _real(name: str, value: Any) -> float:
    if type(value) in (float, int):  # the common case, without the slower ABC check
        return float(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _non_negative(name: str, value: Any) -> float:
    number = _real(name, value)
    if not (math.isfinite(number) and number >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {number!r}")
    return number


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool; TypeError unless it is a bool (or NumPy bool)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_step(step: Any, name: str = "step") -> int:
    """Return ``step`` as an int; it must be an integer >= 1 (booleans are refused)."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1 (the 1-based update number), got {type(step).__name__}")
    if not 1 <= step <= MAX_STEP:
        raise ValueError(f"{name} must be >= 1 and <= 2**53 (the 1-based update number), got {step}")
    return int(step)


def check_group(options: Mapping[str, Any], where: str = "") -> GroupHyperparameters:
    """Validate one group's options (missing ones take :data:`GROUP_DEFAULTS`).

    ``where`` prefixes the argument names in messages, e.g. ``"groups[1]."``.
    """
    if not isinstance(options, Mapping):
        raise TypeError(f"{where.rstrip('.') or 'group'} must be a mapping of options, got {type(options).__name__}")
    unknown = sorted(set(options) - set(GROUP_DEFAULTS))
    if unknown:
        raise ValueError(f"{where}{unknown[0]} is not an option; options are {sorted(GROUP_DEFAULTS)}")
    o = {**GROUP_DEFAULTS, **options}
    betas = o["betas"]
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise TypeError(f"{where}betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (_real(f"{where}betas[{i}]", b) for i, b in enumerate(betas))
    for i, beta in enumerate((beta1, beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}betas[{i}] must be in [0, 1), got {beta!r}")
    schedule = o["schedule"]
    if schedule is not None and not isinstance(schedule, KerasWarmup):
        raise TypeError(f"{where}schedule must be None or a KerasWarmup, got {type(schedule).__name__}")
    return GroupHyperparameters(
        lr=_non_negative(f"{where}lr", o["lr"]),
        beta1=beta1,
        beta2=beta2,
        eps=_non_negative(f"{where}eps", o["eps"]),
        weight_decay=_non_negative(f"{where}weight_decay", o["weight_decay"]),
        decoupled_weight_decay=check_flag(f"{where}decoupled_weight_decay", o["decoupled_weight_decay"]),
        maximize=check_flag(f"{where}maximize", o["maximize"]),
        flavour=resolve_flavour(o["flavour"]),
        schedule=schedule,
    )


def check_groups(groups: Any) -> list[GroupHyperparameters]:
    """Validate a non-empty sequence of group option mappings."""
    if isinstance(groups, Mapping) or not isinstance(groups, Sequence) or len(groups) == 0:
        raise TypeError("groups must be a non-empty sequence of option mappings (dicts)")
    return [check_group(g, f"groups[{i}].") for i, g in enumerate(groups)]


def check_grad_scale(grad_scale: Any) -> float:
    """``grad_scale`` must be a finite real number > 0."""
    value = _real("grad_scale", grad_scale)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"grad_scale must be finite and > 0, got {value!r}")
    return value


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


def _interface(array: Any) -> dict:
    if isinstance(array, np.ndarray):
        return array.__array_interface__
    return array.__cuda_array_interface__


def check_storage(storages: Sequence[str], names: Sequence[str] = BUFFER_NAMES,
                  master: str | None = None, master_name: str = "master_params") -> np.dtype:
    """The math dtype for buffers stored as ``storages`` (params, grads, exp_avg, exp_avg_sq
    dtype names) and an optional master; TypeError naming the buffer and listing what works."""
    def refuse(reason: str) -> None:
        raise TypeError(f"{reason}; supported storage: {SUPPORTED_STORAGE}")

    for name, storage in zip((*names, master_name), (*storages, master)):
        if storage is not None and storage not in STORAGE_FORMATS:
            refuse(f"{name} must have dtype float32, float64, bfloat16 or float16, got {storage}")
    params, _, exp_avg, exp_avg_sq = storages
    if "float64" in storages:
        wide = storages.index("float64")
        for name, storage in zip(names, storages):
            if storage != "float64":
                refuse(f"{name} has dtype {storage} but {names[wide]} is float64: float64 storage is all-float64")
        if master is not None:
            refuse(f"{master_name} goes with bfloat16/float16 params, not with float64 ones")
        return np.dtype(np.float64)
    if exp_avg_sq != exp_avg:
        refuse(f"{names[3]} has dtype {exp_avg_sq} but {names[2]} has {exp_avg}: the moments share one dtype")
    if exp_avg not in ("float32", "bfloat16"):
        refuse(f"{names[2]} must be float32 or bfloat16, got {exp_avg}")
    if master is not None and params not in SIXTEEN_BIT:
        refuse(f"{master_name} is for bfloat16/float16 params, but {names[0]} is {params}")
    if master is not None and master != "float32":
        refuse(f"{master_name} must be float32, got {master}")
    return np.dtype(np.float32)


def check_buffers(buffers: Sequence[Any], names: Sequence[str] = BUFFER_NAMES,
                  written: Sequence[bool] = WRITTEN) -> list[tuple[int, int]]:
    """Check buffers a step will use before it writes any of them.

    They must share the first one's shape and be C-contiguous, and the ``written`` ones
    writeable. Returns each buffer's ``(start, end)`` address span for :func:`check_disjoint`.
    """
    shape = buffers[0].shape
    spans = []
    for name, array, writes in zip(names, buffers, written):
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape} but {names[0]} has {shape}: "
                             "the buffers of a tensor must share one shape")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        address, read_only = _interface(array)["data"]
        if read_only and writes:
            raise ValueError(f"{name} is read-only, but a step writes it in place")
        spans.append((address, address + array.size * array.itemsize))
    return spans


def check_disjoint(names: Sequence[str], spans: Sequence[tuple[int, int]]) -> None:
    """ValueError naming two buffers whose memory overlaps; empty buffers overlap nothing.

    Sorted by start, the spans are disjoint exactly when each ends before the next begins.
    """
    order = sorted((start, i, end) for i, (start, end) in enumerate(spans) if end > start)
    for (_, first, end), (start, second, _) in zip(order, order[1:]):
        if start < end:
            first, second = sorted((first, second))
            raise ValueError(f"{names[first]} and {names[second]} share memory: the buffers must be distinct")
