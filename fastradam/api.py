"""The public steps: validate every argument, fold the scalars on the host, dispatch.

Three entry points share one path (validate -> host scalars -> one backend launch):
:func:`fused_step` for one set of flat buffers, :func:`fused_step_layout` for the segments of
a :class:`~fastradam.layout.FlatLayout` (many tensors, many groups, one launch) and
:func:`fused_step_multi` for lists of separate tensors (one launch through an address table).
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Sequence

import numpy as np

from fastradam.backends import Backend, backend_for
from fastradam.flavours import FlavourLike
from fastradam.layout import FlatLayout
from fastradam.schedules import KerasWarmup
from fastradam.scalars import group_step_scalars, pack_rows, scalar_rows
from fastradam.validation import (
    BUFFER_NAMES,
    check_buffers,
    check_disjoint,
    check_group,
    check_groups,
    check_per_tensor,
    check_step,
)

DEFAULT_GROUPS: tuple[Mapping[str, Any], ...] = ({},)


def _load(names: Sequence[str], objects: Sequence[Any]) -> tuple[Any, list[Any]]:
    """The owning backend's module and the objects as its arrays (zero-copy)."""
    backend: Backend = backend_for(names, objects)
    module = backend.load()
    return module, [module.as_array(obj) for obj in objects]


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
    device_step = not isinstance(step, numbers.Number)
    device_lr = device_step and not isinstance(lr, numbers.Number)
    group = check_group({"lr": 0.0 if device_lr else lr, "betas": betas, "eps": eps,
                         "weight_decay": weight_decay, "decoupled_weight_decay": decoupled_weight_decay,
                         "maximize": maximize, "flavour": flavour, "schedule": schedule})
    host_step = None if device_step else check_step(step)
    backend, buffers = _load(BUFFER_NAMES, (params, grads, exp_avg, exp_avg_sq))
    check_disjoint(BUFFER_NAMES, check_buffers(buffers))
    backend.check_devices(buffers)
    if host_step is not None:
        floats, ints = pack_rows([group_step_scalars(group, host_step)], buffers[0].dtype)
        backend.radam_step(*buffers, floats, ints)
        return
    if not hasattr(backend, "radam_step_on_device"):
        check_step(step)  # raises: a host backend takes only an int step
    if schedule is not None:
        raise ValueError("schedule needs a host step: with a device step, pass the scheduled lr as a device array")
    backend.radam_step_on_device(
        *buffers, step, lr if device_lr else group.lr, beta1=group.beta1, beta2=group.beta2, eps=group.eps,
        weight_decay=group.weight_decay, decoupled_weight_decay=group.decoupled_weight_decay,
        maximize=group.maximize, flavour=group.flavour,
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
) -> None:
    """One RAdam step for every tensor of a flat layout, every group, in one launch.

    Parameters
    ----------
    layout : FlatLayout
        Where each tensor (segment) lives in the flat buffers, and its group.
    params, grads, exp_avg, exp_avg_sq : array
        Flat buffers of ``layout.size`` elements (as :func:`fused_step` requires of its
        buffers); only the segments are read and written, never the padding.
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

    Notes
    -----
    The scalars are computed on the host once per distinct (group, step) pair, rounded to the
    buffer dtype into a small table, and every block of the launch reads its segment's row.
    """
    if not isinstance(layout, FlatLayout):
        raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
    segments = layout.arrays
    checked, steps, active = _check_groups_and_steps(groups, segments.groups, steps, has_grad, len(layout))
    backend, buffers = _load(BUFFER_NAMES, (params, grads, exp_avg, exp_avg_sq))
    check_disjoint(BUFFER_NAMES, check_buffers(buffers))
    backend.check_devices(buffers)
    if buffers[0].size != layout.size:
        raise ValueError(f"params has {buffers[0].size} elements but the layout needs {layout.size}")
    rows, segment_row = scalar_rows(checked, segments.groups, steps, active)
    floats, ints = pack_rows(rows, buffers[0].dtype)
    backend.radam_step_segments(*(b.reshape(-1) for b in buffers), segments, segment_row, floats, ints)


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
) -> None:
    """One RAdam step for lists of separate tensors, in one launch.

    For callers whose tensors are not in one buffer. ``params[i]``, ``grads[i]``,
    ``exp_avg[i]`` and ``exp_avg_sq[i]`` follow :func:`fused_step`'s rules; every tensor
    shares one dtype and one backend, and no two arrays anywhere in the lists overlap.
    ``group_index`` gives each tensor's group (default: all 0); ``steps`` and ``has_grad``
    are as in :func:`fused_step_layout`. Validation is per tensor, in Python: with thousands
    of small tensors a :class:`~fastradam.layout.FlatLayout` is much cheaper per step.
    """
    lists = (params, grads, exp_avg, exp_avg_sq)
    if not all(isinstance(x, Sequence) for x in lists):
        raise TypeError("params, grads, exp_avg and exp_avg_sq must be sequences of arrays")
    count = len(params)
    for name, x in zip(BUFFER_NAMES, lists):
        if len(x) != count:
            raise ValueError(f"{name} has {len(x)} tensors but params has {count}")
    tensor_groups = (np.zeros(count, dtype=np.int64) if group_index is None
                     else check_per_tensor("group_index", group_index, count, "group"))
    checked, steps, active = _check_groups_and_steps(groups, tensor_groups, steps, has_grad, count)
    if count == 0:
        return
    names = [f"{name}[{i}]" for i in range(count) for name in BUFFER_NAMES]
    backend, arrays = _load(names, [x[i] for i in range(count) for x in lists])
    spans = []
    for i in range(count):
        spans += check_buffers(arrays[4 * i:4 * i + 4], names[4 * i:4 * i + 4])
    if any(a.dtype != arrays[0].dtype for a in arrays[::4]):
        bad = next(i for i in range(count) if arrays[4 * i].dtype != arrays[0].dtype)
        raise TypeError(f"params[{bad}] has dtype {arrays[4 * bad].dtype} but params[0] has {arrays[0].dtype}: "
                        "all tensors must share one dtype")
    check_disjoint(names, spans)
    backend.check_devices(arrays)
    rows, tensor_row = scalar_rows(checked, tensor_groups, steps, active)
    floats, ints = pack_rows(rows, arrays[0].dtype)
    backend.radam_step_tensors(*(arrays[k::4] for k in range(4)), tensor_row, floats, ints)
