"""Every argument check of ``fused_step``, in one place, run before any byte is written.

Buffer checks read only the array-interface protocols (``__array_interface__`` for host
arrays, ``__cuda_array_interface__`` for device arrays), so they are the same for every
backend and need no backend import. Errors are TypeError (wrong kind of thing) or
ValueError (right kind, wrong value), and name the argument.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: The storage dtypes the backends implement.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

BUFFER_NAMES = ("params", "grads", "exp_avg", "exp_avg_sq")
#: Buffers a step writes; ``grads`` is only read.
WRITTEN_BUFFERS = ("params", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Hyperparameters:
    """Validated hyperparameters of one step, as plain Python numbers."""

    step: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    maximize: bool


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


def check_step(step: Any) -> int:
    """Return ``step`` as an int; it must be an integer >= 1 (booleans are refused)."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int >= 1 (the 1-based update number), got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the 1-based update number), got {step}")
    return int(step)


def check_hyperparameters(
    *,
    step: Any,
    lr: Any,
    betas: Any,
    eps: Any,
    weight_decay: Any,
    decoupled_weight_decay: Any,
    maximize: Any,
) -> Hyperparameters:
    """Validate the hyperparameters of one step; raise TypeError/ValueError naming the argument."""
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (_real(f"betas[{i}]", b) for i, b in enumerate(betas))
    for i, beta in enumerate((beta1, beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
    return Hyperparameters(
        step=check_step(step),
        lr=_non_negative("lr", lr),
        beta1=beta1,
        beta2=beta2,
        eps=_non_negative("eps", eps),
        weight_decay=_non_negative("weight_decay", weight_decay),
        decoupled_weight_decay=_flag("decoupled_weight_decay", decoupled_weight_decay),
        maximize=_flag("maximize", maximize),
    )


def _interface(array: Any) -> dict:
    interface = getattr(array, "__cuda_array_interface__", None)
    return interface if interface is not None else array.__array_interface__


def check_buffers(buffers: Sequence[Any]) -> None:
    """Check the four buffers (in :data:`BUFFER_NAMES` order) before a step writes any of them.

    They must share one supported dtype and one shape, be C-contiguous, the written ones
    writeable, and no two may overlap in memory.
    """
    dtype = buffers[0].dtype
    shape = buffers[0].shape
    spans = []
    for name, array in zip(BUFFER_NAMES, buffers):
        if array.dtype not in SUPPORTED_DTYPES:
            supported = " or ".join(d.name for d in SUPPORTED_DTYPES)
            raise TypeError(f"{name} must have dtype {supported}, got {array.dtype}")
        if array.dtype != dtype:
            raise TypeError(f"{name} has dtype {array.dtype} but params has {dtype}: all four buffers must share one dtype")
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape} but params has {shape}: all four buffers must share one shape")
        interface = _interface(array)
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        address, read_only = interface["data"]
        if read_only and name in WRITTEN_BUFFERS:
            raise ValueError(f"{name} is read-only, but a step writes it in place")
        spans.append((name, address, address + array.size * array.itemsize))
    for i, (name_a, start_a, end_a) in enumerate(spans):
        for name_b, start_b, end_b in spans[i + 1:]:
            if start_a < end_b and start_b < end_a:
                raise ValueError(f"{name_a} and {name_b} share memory: the four buffers must be distinct")
