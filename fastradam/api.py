"""The public step: validate every argument, fold the scalars on the host, dispatch."""

from __future__ import annotations

from typing import Any

from fastradam.backends import backend_for
from fastradam.scalars import step_scalars
from fastradam.validation import BUFFER_NAMES, check_buffers, check_hyperparameters


def fused_step(
    params: Any,
    grads: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> None:
    r"""Apply one RAdam step in place, in one fused pass over the four buffers.

    Semantics are those of ``torch.optim.RAdam``. With :math:`t` = ``step``, :math:`g` the
    gradient (negated when ``maximize``) and :math:`\lambda` = ``weight_decay``:

    .. math::

        g &\leftarrow g + \lambda p \quad\text{(L2, the default)}, \qquad
        p \leftarrow (1 - \eta\lambda)\, p \quad\text{(decoupled)} \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \rho_\infty &= \frac{2}{1-\beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1-\beta_2^t} \\
        p &\leftarrow p - \eta \frac{m}{1-\beta_1^t} r_t \frac{\sqrt{1-\beta_2^t}}{\sqrt{v}+\epsilon},
        \quad r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}
        \quad\text{if } \rho_t > 5 \\
        p &\leftarrow p - \eta \frac{m}{1-\beta_1^t} \quad\text{otherwise.}

    The step-dependent scalars are computed once on the host in float64, then cast to the
    buffer dtype; the kernel does only per-element work.

    Parameters
    ----------
    params : array
        Parameters, updated in place.
    grads : array
        Gradients, read only.
    exp_avg, exp_avg_sq : array
        First and second moment buffers, updated in place (zeros before the first step).
    step : int
        The 1-based number of this update (``torch.optim.RAdam``'s state ``step`` after
        its increment).
    lr : float, default 1e-3
        Learning rate :math:`\eta`, finite and >= 0.
    betas : tuple of float, default (0.9, 0.999)
        :math:`(\beta_1, \beta_2)`, each in [0, 1).
    eps : float, default 1e-8
        Added to :math:`\sqrt{v}` before the bias correction, finite and >= 0.
    weight_decay : float, default 0
        :math:`\lambda`, finite and >= 0.
    decoupled_weight_decay : bool, default False
        Decay the parameters directly (AdamW style) instead of adding :math:`\lambda p`
        to the gradient.
    maximize : bool, default False
        Maximize the objective (negate the gradient).

    Raises
    ------
    TypeError
        A buffer is not an array the backends take, has an unsupported dtype, or the
        buffers mix dtypes or devices; a hyperparameter has the wrong type.
    ValueError
        Shapes differ, a buffer is not C-contiguous or a written one is read-only, two
        buffers share memory, or a hyperparameter is out of range.

    Notes
    -----
    All four buffers must be C-contiguous arrays of one shape (treated as flat) and one
    dtype (float32 or float64), and pairwise distinct in memory. NumPy arrays run on the
    Numba CPU backend. Every check runs before any byte is written. Non-finite gradients
    propagate into the buffers, as in ``torch.optim.RAdam``.
    """
    hyper = check_hyperparameters(
        step=step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
    )
    raw = (params, grads, exp_avg, exp_avg_sq)
    backend = backend_for(BUFFER_NAMES, raw).load()
    buffers = [backend.as_array(obj) for obj in raw]
    check_buffers(buffers)
    backend.check_devices(buffers)
    scalars = step_scalars(**vars(hyper))
    backend.radam_step(*buffers, scalars)
