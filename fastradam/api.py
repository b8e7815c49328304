"""The public steps: validate every argument, fold the scalars on the host, dispatch.

Three entry points share one path (validate -> host scalars -> one backend launch):
:func:`fused_step` for one set of flat buffers, :func:`fused_step_layout` for the segments of
a :class:`~fastradam.layout.FlatLayout` (many tensors, many groups, one launch) and
:func:`fused_step_multi` for lists of separate tensors (one launch through an address table).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastradam.backends import backend_for
from fastradam.flavours import FlavourLike
from fastradam.layout import FlatLayout
from fastradam.schedules import KerasWarmup
from fastradam.scalars import group_step_scalars, pack_rows, scalar_rows
from fastradam.validation import (
    BUFFER_NAMES,
    WRITTEN,
    check_buffers,
    check_disjoint,
    check_flag,
    check_grad_scale,
    check_group,
    check_groups,
    check_per_tensor,
    check_step,
    check_storage,
)

DEFAULT_GROUPS: tuple[Mapping[str, Any], ...] = ({},)


@dataclass
class _Buffers:
    """Validated buffers of one call, as the backend's arrays."""

    backend: Any
    roles: list[list[Any]]  # params, grads, exp_avg, exp_avg_sq: one list of tensors each
    master: list[Any] | None
    math_dtype: np.dtype
    found_inf: Any


def _check_found_inf(found_inf: Any, backend: Any) -> Any:
    """``None``/a bool for host flags; a device flag the backend reads itself."""
    if found_inf is None or isinstance(found_inf, (bool, np.bool_)):
        return bool(found_inf)
    if isinstance(found_inf, np.ndarray):
        if found_inf.shape != ():
            raise ValueError(f"found_inf must be a bool or a 0-d array, got shape {found_inf.shape}")
        return bool(found_inf)
    if backend_for(("found_inf",), (found_inf,)).module_name != backend.__name__:
        raise TypeError("found_inf must be a bool, a 0-d NumPy array, or a 0-d array on the buffers' device")
    flag = backend.as_array(found_inf)
    if flag.shape != ():
        raise ValueError(f"found_inf must be a bool or a 0-d array, got shape {flag.shape}")
    return flag


def _prepare(quads: Sequence[Sequence[Any]], masters: Sequence[Any] | None, single: bool,
             master_name: str, found_inf: Any, grad_scale: Any) -> _Buffers:
    """Validate every buffer of every tensor: backend, storage, shapes, layout, aliasing, device."""
    check_grad_scale(grad_scale)
    count = len(quads)

    def label(role: str, i: int) -> str:
        return role if single else f"{role}[{i}]"

    names = [label(role, i) for i in range(count) for role in BUFFER_NAMES]
    master_names = [] if masters is None else [label(master_name, i) for i in range(count)]
    objects = [obj for quad in quads for obj in quad] + list(masters or ())
    backend = backend_for(names + master_names, objects).load()
    storages = [backend.storage_of(obj) for obj in objects]
    math_dtype = check_storage(storages[:4], names[:4], storages[4 * count] if masters is not None else None,
                               master_names[0] if master_names else master_name)
    for index, (name, storage) in enumerate(zip(names + master_names, storages)):
        first = index % 4 if index < 4 * count else 4 * count
        if storage != storages[first]:
            raise TypeError(f"{name} has dtype {storage} but {(names + master_names)[first]} has "
                            f"{storages[first]}: all tensors must share one storage per role")
    arrays = backend.as_arrays(objects)
    spans = []
    for i in range(count):
        own = arrays[4 * i:4 * i + 4] + ([arrays[4 * count + i]] if masters is not None else [])
        spans += check_buffers(own, names[4 * i:4 * i + 4] + master_names[i:i + 1], (*WRITTEN, True))
    check_disjoint(names + master_names, spans)
    backend.check_devices(arrays)
    return _Buffers(backend, [arrays[k:4 * count:4] for k in range(4)],
                    None if masters is None else arrays[4 * count:], math_dtype,
                    _check_found_inf(found_inf, backend))


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
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    flavour: FlavourLike = "torch",
    schedule: KerasWarmup | None = None,
    master_params: Any = None,
    grad_scale: float = 1.0,
    found_inf: Any = None,
    check_finite: bool = False,
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
    grad_scale : float, default 1
        The loss scale the gradients carry: the kernel multiplies them by ``1 / grad_scale``
        (no separate unscale pass).
    found_inf : bool or 0-d array, optional
        When set, the step is a no-op: no buffer changes (the caller does not advance
        ``step``). A 0-d CUDA array is read on the device, without host synchronisation.
    check_finite : bool, default False
        Look for NaN/inf gradients first (a read-only pass over ``grads``) and, if there are
        any, skip the step without writing anything.

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
    device_step = not isinstance(step, numbers.Number)
    device_lr = device_step and not isinstance(lr, numbers.Number)
    group = check_group({"lr": 0.0 if device_lr else lr, "betas": betas, "eps": eps,
                         "weight_decay": weight_decay, "decoupled_weight_decay": decoupled_weight_decay,
                         "maximize": maximize, "flavour": flavour, "schedule": schedule})
    host_step = None if device_step else check_step(step)
    check_finite = check_flag("check_finite", check_finite)
    b = _prepare([(params, grads, exp_avg, exp_avg_sq)], None if master_params is None else [master_params],
                 True, "master_params", found_inf, grad_scale)
    (params_a,), (grads_a,), (exp_avg_a,), (exp_avg_sq_a,) = b.roles
    master = None if b.master is None else b.master[0]
    if host_step is not None:
        floats, ints = pack_rows([group_step_scalars(group, host_step)], b.math_dtype, grad_scale)
        b.backend.radam_step(params_a, grads_a, exp_avg_a, exp_avg_sq_a, floats, ints, master=master,
                             found_inf=b.found_inf, check_finite=check_finite)
        return
    if not hasattr(b.backend, "radam_step_on_device"):
        check_step(step)  # raises: a host backend takes only an int step
    if schedule is not None:
        raise ValueError("schedule needs a host step: with a device step, pass the scheduled lr as a device array")
    b.backend.radam_step_on_device(
        params_a, grads_a, exp_avg_a, exp_avg_sq_a, step, lr if device_lr else group.lr, beta1=group.beta1,
        beta2=group.beta2, eps=group.eps, weight_decay=group.weight_decay,
        decoupled_weight_decay=group.decoupled_weight_decay, maximize=group.maximize, flavour=group.flavour,
        master=master, grad_scale=grad_scale, found_inf=b.found_inf, check_finite=check_finite,
    )


def _check_groups_and_steps(groups: Any, tensor_groups: np.ndarray, steps: Any, has_grad: Any,
                            count: int) -> tuple[list, np.ndarray, np.ndarray]:
    checked = check_groups(groups)
    if count and tensor_groups.max() >= len(checked):
        bad = int(np.argmax(tensor_groups >= len(checked)))
        raise ValueError(f"tensor {bad} is in group {int(tensor_groups[bad])}, but only {len(checked)} "
                         "groups were given")
    active = np.ones(count, dtype=bool) if has_grad is None else check_per_tensor("has_grad", has_grad, count, "mask")
    return checked, check_per_tensor("steps", steps, count, "step", active), active


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
    grad_scale: float = 1.0,
    found_inf: Any = None,
    check_finite: bool = False,
) -> None:
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
        Options per group (``lr``, ``betas``, ``eps``, ``weight_decay``,
        ``decoupled_weight_decay``, ``maximize``, ``flavour``, ``schedule``); a missing key
        takes :func:`fused_step`'s default. Segment ``i`` uses ``groups[layout.segments[i].group]``.
    has_grad : array of bool, one per segment, optional
        Segments without a gradient this step are skipped entirely (default: none skipped).
        Advancing ``steps`` is the caller's: ``steps[has_grad] += 1`` before the call.
    master_params, grad_scale, found_inf, check_finite
        As in :func:`fused_step` (``master_params`` is a flat float32 buffer of the layout;
        ``check_finite`` reads only the active segments).

    Notes
    -----
    The scalars are computed on the host once per distinct (group, step) pair, rounded to the
    math dtype into a small table, and every block of the launch reads its segment's row.
    """
    if not isinstance(layout, FlatLayout):
        raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
    segments = layout.arrays
    checked, steps, active = _check_groups_and_steps(groups, segments.groups, steps, has_grad, len(layout))
    check_finite = check_flag("check_finite", check_finite)
    b = _prepare([(params, grads, exp_avg, exp_avg_sq)], None if master_params is None else [master_params],
                 True, "master_params", found_inf, grad_scale)
    flat = [role[0].reshape(-1) for role in b.roles]
    if flat[0].size != layout.size:
        raise ValueError(f"params has {flat[0].size} elements but the layout needs {layout.size}")
    rows, segment_row = scalar_rows(checked, segments.groups, steps, active)
    floats, ints = pack_rows(rows, b.math_dtype, grad_scale)
    b.backend.radam_step_segments(*flat, segments, segment_row, floats, ints,
                                  master=None if b.master is None else b.master[0].reshape(-1),
                                  found_inf=b.found_inf, check_finite=check_finite)


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
    grad_scale: float = 1.0,
    found_inf: Any = None,
    check_finite: bool = False,
) -> None:
    """One RAdam step for lists of separate tensors, in one launch.

    For callers whose tensors are not in one buffer. ``params[i]``, ``grads[i]``,
    ``exp_avg[i]`` and ``exp_avg_sq[i]`` (and ``master_params[i]``) follow :func:`fused_step`'s
    rules; every tensor shares one storage per role and one backend, and no two arrays
    anywhere in the lists overlap. ``group_index`` gives each tensor's group (default: all
    0); ``steps`` and ``has_grad`` are as in :func:`fused_step_layout`. Validation is per
    tensor, in Python: with thousands of small tensors a :class:`~fastradam.layout.FlatLayout`
    is much cheaper per step.
    """
    lists = (params, grads, exp_avg, exp_avg_sq) + (() if master_params is None else (master_params,))
    if not all(isinstance(x, Sequence) for x in lists):
        raise TypeError("params, grads, exp_avg, exp_avg_sq (and master_params) must be sequences of arrays")
    count = len(params)
    for name, x in zip((*BUFFER_NAMES, "master_params"), lists):
        if len(x) != count:
            raise ValueError(f"{name} has {len(x)} tensors but params has {count}")
    tensor_groups = (np.zeros(count, dtype=np.int64) if group_index is None
                     else check_per_tensor("group_index", group_index, count, "group"))
    checked, steps, active = _check_groups_and_steps(groups, tensor_groups, steps, has_grad, count)
    check_finite = check_flag("check_finite", check_finite)
    if count == 0:
        check_grad_scale(grad_scale)
        return
    b = _prepare(list(zip(params, grads, exp_avg, exp_avg_sq)), master_params, False, "master_params",
                 found_inf, grad_scale)
    rows, tensor_row = scalar_rows(checked, tensor_groups, steps, active)
    floats, ints = pack_rows(rows, b.math_dtype, grad_scale)
    b.backend.radam_step_tensors(*b.roles, tensor_row, floats, ints, master=b.master,
                                 found_inf=b.found_inf, check_finite=check_finite)
