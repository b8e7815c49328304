"""Gradient clipping by the global norm, folded into the step: the rules, declared once.

torch's recipe (``GradScaler.unscale_`` + ``torch.nn.utils.clip_grad_norm_`` + the step) reads and
writes every gradient twice before the step reads it again. Here a read-only pre-pass computes the
norm (and so whether a gradient is NaN/inf: the same read that ``check_finite`` makes), and the step
multiplies each gradient by ``inv_grad_scale * coefficient`` inside its own pass: the gradients are
never written.

The norm
    Of the unscaled gradients ``g / grad_scale`` over every active element of the step (inactive
    tensors and layout padding are not read): ``(sum |g|^p)^(1/p) / grad_scale`` for a ``norm_type``
    ``p > 0``, ``max |g| / grad_scale`` for ``inf``, accumulated in float64 whatever the gradients'
    dtype (:data:`fastradam.spec.NORM_CODES` names the kernels' cases: 2, 1 and inf have loops of
    their own). It equals torch's ``clip_grad_norm_`` total norm to float32 rounding (torch
    accumulates float32 gradients in float32).

Determinism
    The pre-pass sums fixed tiles (the Numba backend's ``BLOCK``-element blocks, the CUDA kernel's
    fixed grid), each in :data:`LANES` float64 lanes taken in element order, then the lanes and the
    tiles in a fixed order: the same bits for any thread count and on every run. (Not across
    backends or layouts: their tiles differ.)

The coefficient
    torch's: ``min(1, max_norm / (norm + 1e-6))`` (:func:`clip_coefficient`), in float64; the step's
    gradient factor ``inv_grad_scale * coefficient`` is rounded once to the math dtype.

Non-finite gradients
    make the norm NaN or inf (float64 sums of float32/16 gradients cannot overflow; float64
    gradients whose squares overflow count as non-finite too). With ``check_finite`` (or a set
    ``found_inf``) such a step is skipped and nothing is written: the pre-pass is the finite check,
    there is no second one. Without it the coefficient is torch's (0 for an inf norm, NaN for a NaN
    one) and the step goes on, as torch's ``clip_grad_norm_`` followed by its step does.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from fastradam.spec import NORM_CODES, NORM_EPS
#: The float64 lanes each tile of the norm pre-pass accumulates in (element ``i`` of a tile in lane
#: ``i % LANES``), added in lane order at the tile's end.
LANES = 16


def _positive(name: str, value: Any, also: str = "") -> float:
    """``value`` as a float > 0 (inf included); TypeError/ValueError naming ``name`` (``also``: what else it may be)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number > 0{also}, got {type(value).__name__}")
    number = float(value)
    if not number > 0.0:
        raise ValueError(f"{name} must be > 0{also}, got {number!r}")
    return number


def check_norm_type(norm_type: Any) -> float:
    """``norm_type`` as a float: a real number > 0, or ``inf`` (also the string ``"inf"``, as torch takes)."""
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        return math.inf
    return _positive("norm_type", norm_type, " (or inf)")


def check_max_norm(max_norm: Any) -> float:
    """``max_norm`` as a float: a real number > 0 (inf clips nothing but still computes the norm)."""
    return _positive("max_grad_norm", max_norm)


def norm_code(norm_type: float) -> int:
    """The kernels' case of a checked ``norm_type`` (:data:`fastradam.spec.NORM_CODES`)."""
    if norm_type == 2.0:
        return NORM_CODES["two"]
    if norm_type == 1.0:
        return NORM_CODES["one"]
    if norm_type == math.inf:
        return NORM_CODES["inf"]
    return NORM_CODES["power"]


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch's clip coefficient ``min(1, max_norm / (norm + 1e-6))``, NaN for a NaN norm (as
    ``torch.clamp`` keeps NaN), 0 for an inf one."""
    coefficient = max_norm / (norm + NORM_EPS)
    return coefficient if not coefficient >= 1.0 else 1.0


def finish_norm(total: float, norm_type: float, inv_grad_scale: float = 1.0) -> float:
    """The norm from the pre-pass's ``total`` (``sum |g|^p``, or ``max |g|`` for inf), unscaled."""
    if norm_type == math.inf:
        return total * inv_grad_scale
    if norm_type == 2.0:
        root = math.sqrt(total)
    elif norm_type == 1.0:
        root = total
    else:
        try:
            root = total ** (1.0 / norm_type)
        except OverflowError:  # p < 1 and a huge total: inf, as the kernels' pow gives
            root = math.inf
    return root * inv_grad_scale


def combine_norms(norms: Sequence[float], norm_type: float) -> float:
    """The norm of several disjoint sets of gradients (plans, ranks) from their norms."""
    norm_type = check_norm_type(norm_type)
    if norm_type == math.inf:
        values = [float(n) for n in norms]
        return math.nan if any(n != n for n in values) else max(values, default=0.0)
    if not norms:
        return 0.0
    return finish_norm(math.fsum(float(n) ** norm_type for n in norms), norm_type)


@dataclass(frozen=True)
class Clip:
    """A step's clipping request, checked (the backends' ``clip=`` argument).

    ``max_norm`` None asks for the norm only (no step). ``norm`` is a norm already computed (a float,
    or a 0-d device array on the plan's device): then no pre-pass runs and the coefficient comes
    from it. ``inv_grad_scale`` is ``1 / grad_scale`` in float64.
    """

    max_norm: float | None
    norm_type: float
    inv_grad_scale: float = 1.0
    norm: Any = None

    @property
    def code(self) -> int:
        """:func:`norm_code` of the norm type."""
        return norm_code(self.norm_type)
