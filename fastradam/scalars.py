"""Per-step RAdam scalars, computed once on the host in float64 for every backend.

Kernels do only per-element work; everything that depends on the step number alone
(bias corrections, the SMA length ``rho_t``, the rectification term ``r_t``, the branch, the
folded step size) is decided here, once per call for a flat buffer, or once per distinct
(group, step) pair for a multi-tensor layout (:func:`scalar_rows`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from fastradam.flavours import PRESETS, Flavour
from fastradam.options import GroupOptions
from fastradam.rounding import round_key
from fastradam.spec import MODES, SCALAR_FLOATS, SCALAR_INTS

#: The three element updates, chosen per step (and per segment) on the host.
MOMENTUM = MODES["momentum"]  #: below the threshold: p -= step_size * m
RECTIFIED = MODES["rectified"]  #: above it: p -= step_size * m / (sqrt(v) + eps)
HOLD = MODES["hold"]  #: below it, in flavours that skip the update: moments update, p is left alone


class StepScalars(NamedTuple):
    """Everything a kernel needs for one RAdam step, folded so the element loop is short.

    Its fields are the kernel table's columns in order (:data:`fastradam.spec.SCALAR_FLOATS`
    but the last, then :data:`~fastradam.spec.SCALAR_INTS`), so a row is a slice of it.

    The element update every backend implements, with ``g`` the gradient::

        g  = -g if negate_grad else g
        g  = g + l2_weight_decay * p          # L2 (coupled) weight decay, when nonzero
        m  = m + one_minus_beta1 * (g - m)    # lerp(m, g, 1 - beta1)
        v  = beta2 * v + one_minus_beta2 * g * g
        p  = p * param_decay - step_size * m / (sqrt(v + eps_root) + eps)   mode RECTIFIED
        p  = p * param_decay - step_size * m                     mode MOMENTUM
        p  unchanged                                             mode HOLD

    ``param_decay`` is ``1 - lr * wd`` for decoupled weight decay and exactly 1 otherwise;
    ``eps`` is already scaled by ``sqrt(1 - beta2^t)`` in flavours that add it to
    ``sqrt(v_hat)``, since ``m_hat / (sqrt(v_hat) + eps) = sqrt(bc2)/bc1 * m / (sqrt(v) + eps sqrt(bc2))``;
    ``eps_root`` (optax's, added to ``v_hat``) is scaled by ``bc2``, since
    ``sqrt(v_hat + eps_root) = sqrt(v + eps_root bc2) / sqrt(bc2)``, and the add is skipped when it is 0
    (so the default step is bit-identical to one without it).
    """

    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    eps_root: float
    l2_weight_decay: float
    param_decay: float
    step_size: float
    negate_grad: bool
    mode: int
    round_key_lo: int = 0
    round_key_hi: int = 0


def sma_length(step: int, beta2: float) -> tuple[float, float]:
    """Return ``(rho_inf, rho_t)``, the maximum and step-``t`` length of the approximated SMA.

    ``rho_inf = 2/(1-beta2) - 1`` and ``rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)``.
    """
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    beta2_t = beta2**step
    return rho_inf, rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)


def step_scalars(
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    flavour: Flavour = PRESETS["torch"],
    eps_root: float = 0.0,
    round_seed: int | None = None,
) -> StepScalars:
    """Fold the hyperparameters of step ``step`` (1-based) into a :class:`StepScalars`.

    With ``bc1 = 1 - beta1^t`` and ``bc2 = 1 - beta2^t``, the rectified step size is
    ``lr * r_t * sqrt(bc2) / bc1`` with
    ``r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))``,
    and ``lr / bc1`` below the threshold. All arithmetic is float64. With a ``round_seed``, the
    step's stochastic-rounding key (:func:`fastradam.rounding.round_key`) fills the key fields.
    """
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    rho_inf, rho_t = sma_length(step, beta2)
    if flavour.rectifies(rho_t):
        mode = RECTIFIED
        rect = math.sqrt(
            (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
        )
        step_size = lr * rect * math.sqrt(bias_correction2) / bias_correction1
    else:
        mode = MOMENTUM if flavour.below_threshold == "momentum" else HOLD
        step_size = lr / bias_correction1 if mode == MOMENTUM else 0.0
    decays = decoupled_weight_decay and mode != HOLD
    return StepScalars(
        1.0 - beta1,  # one_minus_beta1
        beta2,
        1.0 - beta2,  # one_minus_beta2
        eps * math.sqrt(bias_correction2) if flavour.eps_on_v_hat else eps,  # eps
        eps_root * bias_correction2,  # eps_root
        0.0 if decoupled_weight_decay else weight_decay,  # l2_weight_decay
        1.0 - lr * weight_decay if decays else 1.0,  # param_decay
        step_size,
        maximize,  # negate_grad
        mode,
        *((0, 0) if round_seed is None else round_key(round_seed, step)),  # round_key_lo, round_key_hi
    )


#: Where a row's reals (but the last, ``1 / grad_scale``, the same for every row) end in a StepScalars.
_REALS = len(SCALAR_FLOATS) - 1


def pack_rows(rows: Sequence[StepScalars], dtype: np.dtype, grad_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Kernel tables of ``rows``: reals ``(R, F)`` rounded to the math ``dtype``, ints ``(R, I)`` int32.

    Columns follow :data:`fastradam.spec.SCALAR_FLOATS` (the last one is ``1 / grad_scale``, the
    same for every row) and :data:`fastradam.spec.SCALAR_INTS`. The float64 values are rounded
    once, here, exactly as a kernel argument ``np.float32(x)`` would be.
    """
    inv_grad_scale = 1.0 / grad_scale
    floats = np.array([(*r[:_REALS], inv_grad_scale) for r in rows], dtype=dtype).reshape(-1, len(SCALAR_FLOATS))
    ints = np.array([r[_REALS:] for r in rows], dtype=np.int32).reshape(-1, len(SCALAR_INTS))
    return floats, ints


def pack_row_into(floats: np.ndarray, ints: np.ndarray, scalars: StepScalars, grad_scale: float = 1.0) -> None:
    """Row 0 of existing tables (as :func:`pack_rows` makes them) set to ``scalars``, in place."""
    floats[0] = (*scalars[:_REALS], 1.0 / grad_scale)
    ints[0] = scalars[_REALS:]


def group_step_scalars(group: GroupOptions, step: int, round_seed: int | None = None) -> StepScalars:
    """The scalars of step ``step`` for a validated group (its schedule, if any, sets the lr)."""
    lr = group.schedule.lr_at(step, group.lr) if group.schedule is not None else group.lr
    return step_scalars(step=step, lr=lr, beta1=group.beta1, beta2=group.beta2, eps=group.eps,
                        weight_decay=group.weight_decay, decoupled_weight_decay=group.decoupled_weight_decay,
                        maximize=group.maximize, flavour=group.flavour, eps_root=group.eps_root,
                        round_seed=round_seed)


def scalar_rows(groups: Sequence[GroupOptions], tensor_groups: np.ndarray, steps: np.ndarray,
                active: np.ndarray, round_seed: int | None = None) -> tuple[list[StepScalars], np.ndarray]:
    """Scalars for many tensors, computed once per distinct (group, step) pair.

    Returns the rows and, per tensor, the int32 index of its row (-1 for inactive tensors).
    In the usual case every tensor of a group shares its step, so there is one row a group.
    """
    tensor_row = np.full(tensor_groups.shape, -1, dtype=np.int32)
    rows: list[StepScalars] = []
    for index, group in enumerate(groups):
        members = np.flatnonzero((tensor_groups == index) & active)
        if members.size == 0:
            continue
        member_steps = steps[members]
        if member_steps.min() == member_steps.max():
            distinct, inverse = member_steps[:1], np.zeros(members.size, dtype=np.int64)
        else:
            distinct, inverse = np.unique(member_steps, return_inverse=True)
        tensor_row[members] = len(rows) + inverse
        rows.extend(group_step_scalars(group, int(step), round_seed) for step in distinct)
    return rows, tensor_row
