"""Per-step RAdam scalars, computed once on the host in float64 for every backend.

Kernels do only per-element work; everything that depends on the step number alone
(bias corrections, the SMA length ``rho_t``, the rectification term ``r_t``, the
branch, the folded step size) is decided here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: ``torch.optim.RAdam`` rectifies the adaptive step when ``rho_t > RECTIFY_THRESHOLD``.
RECTIFY_THRESHOLD = 5.0


@dataclass(frozen=True)
class StepScalars:
    """Everything a kernel needs for one RAdam step, folded so the element loop is short.

    The element update every backend implements, with ``g`` the gradient::

        g  = -g if maximize else g
        g  = g + l2_weight_decay * p          # L2 (coupled) weight decay; 0 when decoupled
        p  = p * param_decay                  # decoupled: 1 - lr*wd; else exactly 1
        m  = m + one_minus_beta1 * (g - m)    # lerp(m, g, 1 - beta1)
        v  = beta2 * v + one_minus_beta2 * g * g
        p  = p - step_size * m / (sqrt(v) + eps)   if rectified
        p  = p - step_size * m                     otherwise
    """

    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    eps: float
    l2_weight_decay: float
    param_decay: float
    negate_grad: bool
    rectified: bool
    step_size: float


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
) -> StepScalars:
    """Fold the hyperparameters of step ``step`` (1-based) into a :class:`StepScalars`.

    With ``bc1 = 1 - beta1^t`` and ``bc2 = 1 - beta2^t``, the rectified step size is
    ``lr * r_t * sqrt(bc2) / bc1`` with
    ``r_t = sqrt((rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t))``,
    and ``lr / bc1`` below the threshold. All arithmetic is float64.
    """
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    rho_inf, rho_t = sma_length(step, beta2)
    rectified = rho_t > RECTIFY_THRESHOLD
    if rectified:
        rect = math.sqrt(
            (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
        )
        step_size = lr * rect * math.sqrt(bias_correction2) / bias_correction1
    else:
        step_size = lr / bias_correction1
    return StepScalars(
        beta2=beta2,
        one_minus_beta1=1.0 - beta1,
        one_minus_beta2=1.0 - beta2,
        eps=eps,
        l2_weight_decay=0.0 if decoupled_weight_decay else weight_decay,
        param_decay=1.0 - lr * weight_decay if decoupled_weight_decay else 1.0,
        negate_grad=maximize,
        rectified=rectified,
        step_size=step_size,
    )
