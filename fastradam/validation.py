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
from typing import Any, Mapping, Sequence

import numpy as np

from fastradam.flavours import Flavour, resolve_flavour
from fastradam.schedules import KerasWarmup

#: The storage dtypes the backends implement.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

BUFFER_NAMES = ("params", "grads", "exp_avg", "exp_avg_sq")
#: Buffers a step writes; ``grads`` is only read.
WRITTEN_BUFFERS = ("params", "exp_avg", "exp_avg_sq")

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
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _non_negative(name: str, value: Any) -> float:
    number = _real(name, value)
    if not (math.isfinite(number) and number >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {number!r}")
    return number


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_step(step: Any, name: str = "step") -> int:
    """Return ``step`` as an int; it must be an integer >= 1 (booleans are refused)."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1 (the 1-based update number), got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"{name} must be >= 1 (the 1-based update number), got {step}")
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
        decoupled_weight_decay=_flag(f"{where}decoupled_weight_decay", o["decoupled_weight_decay"]),
        maximize=_flag(f"{where}maximize", o["maximize"]),
        flavour=resolve_flavour(o["flavour"]),
        schedule=schedule,
    )


def check_groups(groups: Any) -> list[GroupHyperparameters]:
    """Validate a non-empty sequence of group option mappings."""
    if isinstance(groups, Mapping) or not isinstance(groups, Sequence) or len(groups) == 0:
        raise TypeError("groups must be a non-empty sequence of option mappings (dicts)")
    return [check_group(g, f"groups[{i}].") for i, g in enumerate(groups)]


def check_per_tensor(name: str, values: Any, count: int, kind: str, active: np.ndarray | None = None) -> np.ndarray:
    """A 1-D host array of ``count`` entries: ``kind`` "step" (ints >= 1 where ``active``),
    "group" (ints >= 0) or "mask" (bools)."""
    array = np.asarray(values)
    if array.shape != (count,):
        raise ValueError(f"{name} must have one entry per tensor ({count}), got shape {array.shape}")
    if kind == "mask":
        if array.dtype != np.bool_:
            raise TypeError(f"{name} must be booleans, got dtype {array.dtype}")
        return array
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {array.dtype}")
    smallest = 1 if kind == "step" else 0
    checked = array if active is None else array[active]
    if checked.size and checked.min() < smallest:
        raise ValueError(f"{name} must be >= {smallest}, got {checked.min()}")
    return array.astype(np.int64, copy=False)


def _interface(array: Any) -> dict:
    if isinstance(array, np.ndarray):
        return array.__array_interface__
    return array.__cuda_array_interface__


def check_buffers(buffers: Sequence[Any], names: Sequence[str] = BUFFER_NAMES) -> list[tuple[int, int]]:
    """Check one set of four buffers (params, grads, exp_avg, exp_avg_sq) before a step writes them.

    They must share one supported dtype and one shape, be C-contiguous and the written ones
    writeable. Returns each buffer's ``(start, end)`` address span for :func:`check_disjoint`.
    """
    dtype = buffers[0].dtype
    shape = buffers[0].shape
    spans = []
    for index, (name, array) in enumerate(zip(names, buffers)):
        if array.dtype not in SUPPORTED_DTYPES:
            supported = " or ".join(d.name for d in SUPPORTED_DTYPES)
            raise TypeError(f"{name} must have dtype {supported}, got {array.dtype}")
        if array.dtype != dtype:
            raise TypeError(f"{name} has dtype {array.dtype} but {names[0]} has {dtype}: "
                            "all buffers must share one dtype")
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape} but {names[0]} has {shape}: "
                             "all four buffers must share one shape")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        address, read_only = _interface(array)["data"]
        if read_only and BUFFER_NAMES[index] in WRITTEN_BUFFERS:
            raise ValueError(f"{name} is read-only, but a step writes it in place")
        spans.append((address, address + array.size * array.itemsize))
    return spans


def check_disjoint(names: Sequence[str], spans: Sequence[tuple[int, int]]) -> None:
    """ValueError naming two buffers whose memory overlaps; empty buffers overlap nothing."""
    bounds = np.array(spans, dtype=np.uint64).reshape(-1, 2)
    nonempty = np.flatnonzero(bounds[:, 1] > bounds[:, 0])
    order = nonempty[np.argsort(bounds[nonempty, 0], kind="stable")]
    overlapping = np.flatnonzero(bounds[order[1:], 0] < bounds[order[:-1], 1])
    if overlapping.size:
        first, second = sorted((int(order[overlapping[0]]), int(order[overlapping[0] + 1])))
        raise ValueError(f"{names[first]} and {names[second]} share memory: the buffers must be distinct")
