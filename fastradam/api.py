"""The one-shot steps: each binds a :class:`~fastradam.plan.StepPlan` and takes one step with it.

Three entry points share one path (validate -> host scalars -> one backend launch):
:func:`fused_step` for one set of flat buffers, :func:`fused_step_layout` for the segments of
a :class:`~fastradam.layout.FlatLayout` (many tensors, many groups, one launch) and
:func:`fused_step_multi` for lists of separate tensors (one launch through an address table).
A caller that steps the same buffers again and again binds a plan once instead.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from fastradam.flavours import FlavourLike
from fastradam.layout import FlatLayout
from fastradam.plan import StepPlan
from fastradam.schedules import KerasWarmup

DEFAULT_GROUPS: tuple[Mapping[str, Any], ...] = ({},)


def fused_step(
    params: Any,
    grads: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    step: Any,
    lr: Any = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    flavour: FlavourLike = "torch",
    schedule: KerasWarmup | None = None,
    master_params: Any = None,
    param_remainders: Any = None,
    stochastic_round_seed: int | None = None,
    grad_scale: float = 1.0,
    found_inf: Any = None,
    check_finite: bool = False,
    max_grad_norm: float | None = None,
    norm_type: float = 2.0,
) -> Any:
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
        p &\leftarrow p - \eta \frac{m}{1-\beta_1^t} r_t
              \frac{\sqrt{1-\beta_2^t}}{\sqrt{v + (1-\beta_2^t)\,\epsilon_{root}}+\epsilon},
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
    step : int or 0-d CUDA array
        The 1-based number of this update (``torch.optim.RAdam``'s state ``step`` after
        its increment). On the CUDA backend it may be a 0-d device array (int or float):
        the scalars are then computed on the device in float64, in the same launch, so the
        step can be captured in a CUDA graph and replayed while the count advances on the
        device (torch's ``capturable=True``; a step < 1 there is not detected).
    lr : float or 0-d CUDA array, default 1e-3
        Learning rate :math:`\eta`, finite and >= 0 (a device array only with a device step).
    betas : tuple of float, default (0.9, 0.999)
        :math:`(\beta_1, \beta_2)`, each in [0, 1).
    eps : float, default 1e-8
        Added to :math:`\sqrt{v}` before the bias correction, finite and >= 0.
    eps_root : float, default 0
        optax's ``eps_root``: added to :math:`\hat v = v / (1-\beta_2^t)` under the square root
        (:math:`1/(\sqrt{\hat v + \epsilon_{root}} + \ldots)`), finite and >= 0; 0 adds nothing.
    weight_decay : float, default 0
        :math:`\lambda`, finite and >= 0.
    decoupled_weight_decay : bool, default False
        Decay the parameters directly (AdamW style) instead of adding :math:`\lambda p`
        to the gradient.
    maximize : bool, default False
        Maximize the objective (negate the gradient).
    flavour : str or Flavour, default "torch"
        The RAdam variant: a preset of :data:`fastradam.flavours.PRESETS` (``"torch"``,
        ``"authors"``, ``"optax"``, ``"keras"``, ``"tfa"``, ``"timm_legacy"``, ``"fastai"``,
        ``"paper"``) or a :class:`~fastradam.flavours.Flavour`.
    schedule : KerasWarmup, optional
        A learning-rate schedule evaluated on the host at ``step`` (``lr`` is its base rate).
    master_params : array, optional
        float32 master weights beside bfloat16/float16 ``params``: the step reads and updates
        the master and writes its rounded copy (nearest-even) into ``params`` in the same pass.
    param_remainders : array, optional
        int16 remainders beside bfloat16 ``params`` instead of a master (Transformer Engine's
        ``store_param_remainders`` format): params and remainders are the fp32 master's two
        halves, bit for bit (the same masters as ``master_params`` would hold), so the state is
        2 bytes per element instead of 4. ``params`` show the master rounded to nearest, ties
        away from zero (:mod:`fastradam.rounding`). Start them at zero.
    stochastic_round_seed : int, optional
        bfloat16 ``params`` without a master, rounded stochastically: the bits come from a hash
        of (seed, ``step``, element index), identical on every backend and thread count, so a run
        resumed with the same seed continues the same stream.
    grad_scale : float, default 1
        The loss scale the gradients carry: the kernel multiplies them by ``1 / grad_scale``
        (no separate unscale pass).
    found_inf : bool or 0-d array, optional
        When set, the step is a no-op: no buffer changes (the caller does not advance
        ``step``). A 0-d CUDA array is read on the device, without host synchronisation.
    check_finite : bool, default False
        Look for NaN/inf gradients first (a read-only pass over ``grads``) and, if there are
        any, skip the step without writing anything.
    max_grad_norm : float, optional
        Clip the gradients by their global norm inside the step, as
        ``torch.nn.utils.clip_grad_norm_(max_norm=max_grad_norm, norm_type=norm_type)`` before it
        would, without writing them (:mod:`fastradam.clipping`): a read-only pre-pass computes the
        norm of ``grads / grad_scale`` in float64 (deterministic for any thread count), and the step
        multiplies each gradient by ``min(1, max_grad_norm / (norm + 1e-6)) / grad_scale``. With
        ``check_finite`` that pre-pass is the finite check (a NaN/inf norm skips the step).
    norm_type : float, default 2
        The clipping norm's p: any p > 0, or ``inf`` (the largest magnitude).

    Returns
    -------
    float or 0-d CUDA array or None
        With ``max_grad_norm``, the norm of the unscaled gradients before clipping (on CUDA a
        0-d float64 device array, never synchronised); otherwise None.

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
    All buffers must be C-contiguous arrays of one shape (treated as flat), pairwise
    distinct in memory, on one device. Storage: float64 everywhere (math in float64), or
    params float32/bfloat16/float16, grads float32/bfloat16/float16, both moments float32 or
    both bfloat16 (math in float32; NumPy bfloat16 is ``ml_dtypes.bfloat16``). NumPy arrays
    run on the Numba CPU backend. Every check runs before any byte is written. Without
    ``check_finite``, non-finite gradients propagate into the buffers, as in
    ``torch.optim.RAdam``.
    """
    host_lr = type(lr) is float or isinstance(lr, numbers.Number)  # else a device lr, read at the launch
    return StepPlan(params, grads, exp_avg, exp_avg_sq, master_params=master_params, param_remainders=param_remainders,
             stochastic_round_seed=stochastic_round_seed, check_finite=check_finite,
             lr=lr if host_lr or lr is None else 0.0, betas=betas, eps=eps, eps_root=eps_root,
             weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
             flavour=flavour, schedule=schedule,
             ).step(step, lr=None if host_lr else lr, grad_scale=grad_scale, found_inf=found_inf,
                    max_grad_norm=max_grad_norm, norm_type=norm_type)


def fused_step_layout(
    layout: FlatLayout,
    params: Any,
    grads: Any,
    exp_avg: Any,
    exp_avg_sq: Any,
    *,
    steps: Any,
    groups: Sequence[Mapping[str, Any]] = DEFAULT_GROUPS,
    has_grad: Any = None,
    master_params: Any = None,
    param_remainders: Any = None,
    stochastic_round_seed: int | None = None,
    grad_scale: float = 1.0,
    found_inf: Any = None,
    check_finite: bool = False,
    max_grad_norm: float | None = None,
    norm_type: float = 2.0,
) -> Any:
    """One RAdam step for every tensor of a flat layout, every group, in one launch.

    Parameters
    ----------
    layout : FlatLayout
        Where each tensor (segment) lives in the flat buffers, and its group.
    params, grads, exp_avg, exp_avg_sq : array
        Flat buffers of ``layout.size`` elements (storage as in :func:`fused_step`); only the
        segments are read and written, never the padding.
    steps : array of int, one per segment
        The 1-based number of this update for each segment (torch keeps ``step`` per
        parameter); entries of segments with ``has_grad`` False are ignored.
    groups : sequence of dict, default ``({},)``
        Options per group (``lr``, ``betas``, ``eps``, ``eps_root``, ``weight_decay``,
        ``decoupled_weight_decay``, ``maximize``, ``flavour``, ``schedule``); a missing key
        takes :func:`fused_step`'s default. Segment ``i`` uses ``groups[layout.segments[i].group]``.
    has_grad : array of bool, one per segment, optional
        Segments without a gradient this step are skipped entirely (default: none skipped).
        Advancing ``steps`` is the caller's: ``steps[has_grad] += 1`` before the call.
    master_params, param_remainders, stochastic_round_seed, grad_scale, found_inf, check_finite, max_grad_norm, norm_type
        As in :func:`fused_step` (``master_params`` and ``param_remainders`` are flat buffers of the layout;
        ``check_finite`` and the clipping norm read only the active segments). Returns the norm with
        ``max_grad_norm``, as :func:`fused_step` does.

    Notes
    -----
    The scalars are computed on the host once per distinct (group, step) pair, rounded to the
    math dtype into a small table, and every block of the launch reads its segment's row.
    """
    if not isinstance(layout, FlatLayout):
        raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
    return StepPlan(params, grads, exp_avg, exp_avg_sq, layout=layout, master_params=master_params,
             param_remainders=param_remainders, stochastic_round_seed=stochastic_round_seed, groups=groups,
             check_finite=check_finite).step(steps=steps, has_grad=has_grad, grad_scale=grad_scale,
                                             found_inf=found_inf, max_grad_norm=max_grad_norm,
                                             norm_type=norm_type)


def fused_step_multi(
    params: Sequence[Any],
    grads: Sequence[Any],
    exp_avg: Sequence[Any],
    exp_avg_sq: Sequence[Any],
    *,
    steps: Any,
    groups: Sequence[Mapping[str, Any]] = DEFAULT_GROUPS,
    group_index: Any = None,
    has_grad: Any = None,
    master_params: Sequence[Any] | None = None,
    param_remainders: Sequence[Any] | None = None,
    stochastic_round_seed: int | None = None,
    grad_scale: float = 1.0,
    found_inf: Any = None,
    check_finite: bool = False,
    max_grad_norm: float | None = None,
    norm_type: float = 2.0,
) -> Any:
    """One RAdam step for lists of separate tensors, in one launch.

    For callers whose tensors are not in one buffer. ``params[i]``, ``grads[i]``,
    ``exp_avg[i]`` and ``exp_avg_sq[i]`` (and ``master_params[i]``) follow :func:`fused_step`'s
    rules; every tensor shares one storage per role and one backend, and no two arrays
    anywhere in the lists overlap. ``group_index`` gives each tensor's group (default: all
    0); ``steps`` and ``has_grad`` are as in :func:`fused_step_layout`. Validation is per
    tensor, in Python: with thousands of small tensors a :class:`~fastradam.layout.FlatLayout`
    is much cheaper per step. ``max_grad_norm`` and ``norm_type`` clip by the norm of all the
    active tensors' gradients, as in :func:`fused_step` (which returns it).
    """
    lists = (params, grads, exp_avg, exp_avg_sq) + tuple(x for x in (master_params, param_remainders) if x is not None)
    if not all(isinstance(x, Sequence) for x in lists):
        raise TypeError("params, grads, exp_avg, exp_avg_sq (and master_params or param_remainders) must be "
                        "sequences of arrays")
    return StepPlan(list(params), list(grads), list(exp_avg), list(exp_avg_sq), groups=groups, group_index=group_index,
             master_params=None if master_params is None else list(master_params),
             param_remainders=None if param_remainders is None else list(param_remainders),
             stochastic_round_seed=stochastic_round_seed,
             check_finite=check_finite).step(steps=steps, has_grad=has_grad, grad_scale=grad_scale,
                                             found_inf=found_inf, max_grad_norm=max_grad_norm,
                                             norm_type=norm_type)
