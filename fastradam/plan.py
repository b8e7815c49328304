"""Bound step plans: validate the buffers and options once, then step many times.

``plan = StepPlan(params, grads, exp_avg, exp_avg_sq, lr=...)`` checks everything a step needs
(backend, storage, shapes, contiguity, writeability, aliasing, devices, options) and settles
what depends only on the buffers (the backend's arrays, the storage, the tables of a layout);
``plan.step(step=t)`` then folds the scalars on the host in float64 and makes one launch, after a
cheap check that the bound buffers were not resized or re-pointed behind the plan's back. The
one-shot functions of :mod:`fastradam.api` and the torch drop-in are built on it.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from fastradam.backends import backend_for, is_device_array
from fastradam.clipping import Clip, check_max_norm, check_norm_type
from fastradam.layout import FlatLayout
from fastradam.options import CheckedGroups, GroupOptions, check_flag, check_grad_scale, check_step, \
    non_negative
from fastradam.scalars import group_step_scalars, pack_row_into, pack_rows, scalar_rows
from fastradam.spec import SCALAR_FLOATS, SCALAR_INTS
from fastradam.rounding import check_seed
from fastradam.storage import BUFFER_NAMES, MASTER, REMAINDERS, WRITTEN, Storage, check_storage
from fastradam.validation import (address_spans, check_buffers, check_disjoint, check_indices, check_mask,
                                  check_steps, own_their_memory)

#: The module of the host backend, whose arrays are plain NumPy arrays.
_NUMPY_BACKEND = "fastradam.backends.numba"
#: The outcome of a binding's checks (backend, storage, address spans), by what settles it: the
#: roles and the objects' types and fingerprints. A fingerprint holds the address of a device array
#: or torch tensor, so their spans are part of the key; NumPy arrays (no subclasses) qualify when
#: each owns its memory (then no two overlap, whatever their addresses). Binding buffers like these again (a
#: one-shot step in a loop) skips the checks. The cache holds no reference to any buffer.
_CHECKED_BUFFERS: dict[tuple, tuple] = {}
_CHECKED_BUFFERS_SIZE = 256


def _checks_key(roles: Sequence[str], single: bool, objects: list[Any]) -> tuple[tuple | None, list[tuple] | None]:
    """The :data:`_CHECKED_BUFFERS` key of a binding (None where its checks depend on more) and the
    objects' fingerprints (None where an object is no array)."""
    if all(type(obj) is np.ndarray for obj in objects):
        fingerprints = [_fingerprint(obj) for obj in objects]
        return ((tuple(roles), single, tuple(fingerprints)) if own_their_memory(objects) else None), fingerprints
    try:
        fingerprints = [_fingerprint(obj) for obj in objects]
    except AttributeError:  # not an array the backends take: the checks say what it lacks
        return None, None
    if any(isinstance(obj, np.ndarray) or fingerprint[3] is None for obj, fingerprint in zip(objects, fingerprints)):
        return None, fingerprints
    return (tuple(roles), single, tuple(map(type, objects)), tuple(fingerprints)), fingerprints


def _fingerprint(obj: Any) -> tuple:
    """What must not change under a bound buffer: its shape, strides, dtype and writeability (a
    NumPy array is passed to its kernel itself), or where its data lives (a torch tensor's or CuPy
    array's address, besides its shape, strides and dtype)."""
    if isinstance(obj, np.ndarray):
        return obj.shape, obj.strides, obj.dtype, obj.flags.writeable
    data_ptr = getattr(obj, "data_ptr", None)
    if callable(data_ptr):
        return tuple(obj.shape), tuple(obj.stride()), obj.dtype, data_ptr(), obj.device
    data = getattr(obj, "data", None)
    return tuple(obj.shape), tuple(obj.strides), obj.dtype, getattr(data, "ptr", None)


def _check_found_inf(found_inf: Any, backend: Any) -> Any:
    """``None``/a bool for host flags; a device flag the backend reads itself."""
    if found_inf is None or found_inf is False or found_inf is True or isinstance(found_inf, np.bool_):
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


def _check_buffers(roles: Sequence[str], objects: list[Any], names: list[str], width: int,
                   single: bool, stochastic: bool) -> tuple[Any, Storage, list[Any], list[tuple[int, int]] | None]:
    """The checks of a binding (:meth:`StepPlan._bind`): the backend, the storage, the buffers' arrays,
    and their address spans (None where distinct NumPy arrays own their memory)."""
    backend = backend_for(names, objects).load()
    storages = [backend.storage_of(obj) for obj in objects]
    first = dict(zip(roles, storages))
    storage = check_storage(
        tuple(first.get(role, first["params"]) for role in BUFFER_NAMES),  # unbound grads: checked per step
        tuple(role if single else f"{role}[0]" for role in BUFFER_NAMES), first.get(MASTER.name),
        MASTER.name if single else f"{MASTER.name}[0]", first.get(REMAINDERS.name), stochastic)
    for index in range(width, len(objects)):
        if storages[index] != storages[index % width]:
            raise TypeError(f"{names[index]} has dtype {storages[index]} but {names[index % width]} has "
                            f"{storages[index % width]}: all tensors must share one storage per role")
    arrays = backend.as_arrays(objects)
    written = [WRITTEN[role] for role in roles]
    for start in range(0, len(arrays), width):
        check_buffers(arrays[start:start + width], names[start:start + width], written)
    if own_their_memory(objects):
        spans = None  # distinct arrays owning their memory: disjoint (addresses only if grads come later)
    else:
        spans = address_spans(arrays)
        check_disjoint(names, spans)
    backend.check_devices(arrays, names)
    return backend, storage, arrays, spans


class StepPlan:
    """RAdam steps over buffers bound once.

    ``kind`` is what was bound: ``"flat"`` (one set of flat buffers), ``"layout"`` (the segments
    of a :class:`~fastradam.layout.FlatLayout`) or ``"tensors"`` (lists of separate tensors).

    Parameters
    ----------
    params, grads, exp_avg, exp_avg_sq : array, or sequence of arrays
        The buffers, as :func:`fastradam.fused_step` takes them (flat arrays), as
        :func:`fastradam.fused_step_layout` does (with ``layout``), or lists of separate tensors
        as :func:`fastradam.fused_step_multi` does.
    layout : FlatLayout, optional
        The segments of the flat buffers (many tensors, many groups, one launch).
    master_params : array or sequence of arrays, optional
        float32 master weights beside bfloat16/float16 params.
    param_remainders : array or sequence of arrays, optional
        int16 remainders beside bfloat16 params (Transformer Engine's ``store_param_remainders``):
        with the params they are the fp32 master, bit for bit, in 2 bytes per element instead of 4;
        the step decodes them, updates in fp32 and writes both halves (:mod:`fastradam.rounding`).
        Zeros make the master the params' values. Not with ``master_params``.
    stochastic_round_seed : int, optional
        Round bfloat16 params stochastically (no master) with random bits hashed from this seed,
        the step number and each element's global index (its place among all the bound tensors
        in order, active or not; layout padding not counted): the same bits on every backend,
        thread count and layout. Host step numbers only.
    groups : sequence of dict, optional
        Options per group (layouts and tensor lists); without it, ``**options`` are the one group.
    group_index : array of int, optional
        A tensor list's group of each tensor (default: all 0); a layout's segments carry theirs.
    check_finite : bool, default False
        Look for NaN/inf gradients first at every step and skip the step if there are any.
    **options
        ``lr``, ``betas``, ``eps``, ``eps_root``, ``weight_decay``, ``decoupled_weight_decay``,
        ``maximize``, ``flavour``, ``schedule`` (:data:`fastradam.options.OPTIONS`).

    Every check runs here, before anything is written; a step checks only what it is given
    (the step numbers, new options, new gradients) and that the bound buffers still have the
    shapes (and, for device arrays, the addresses) they were bound with.

    Examples
    --------
    >>> import numpy as np, fastradam
    >>> p, g, m, v = (np.ones(8, np.float32) for _ in range(4))
    >>> plan = fastradam.StepPlan(p, g, m, v, lr=1e-2)
    >>> for t in range(1, 4):
    ...     plan.step(step=t)
    """

    def __init__(self, params: Any, grads: Any, exp_avg: Any, exp_avg_sq: Any, *, layout: FlatLayout | None = None,
                 master_params: Any = None, param_remainders: Any = None,
                 stochastic_round_seed: int | None = None, groups: Sequence[Mapping[str, Any]] | None = None,
                 group_index: Any = None, check_finite: bool = False, **options: Any) -> None:
        if groups is not None and options:
            raise TypeError(f"pass options either per group (groups=...) or as keywords, not both: {sorted(options)}")
        self.check_finite = check_flag("check_finite", check_finite)
        self.round_seed = None if stochastic_round_seed is None else check_seed(stochastic_round_seed)
        if master_params is not None and param_remainders is not None:
            raise TypeError("pass master_params or param_remainders, not both: the remainders are the master's "
                            "low halves, the params its high halves")
        keeper_role, keeper = ((REMAINDERS.name, param_remainders) if param_remainders is not None
                               else (MASTER.name, master_params))
        self._pending: tuple | None = None  # groups a step was given, kept once all its checks passed
        self._written: tuple | None = None  # the written buffers' address spans (tensor lists), on first use
        self._groups = CheckedGroups([options] if groups is None else groups, keywords=groups is None)
        lists = (params, grads, exp_avg, exp_avg_sq)
        if type(params) is np.ndarray and layout is None:  # the common case, without the ABC checks below
            if group_index is not None:
                raise TypeError("group_index is for tensor lists; a layout's segments carry their groups")
            self.kind = "flat"
            self._bind_flat(lists, keeper_role, keeper, None)
            return
        if grads is None and (layout is not None or not isinstance(params, Sequence) or hasattr(params, "shape")):
            raise TypeError("grads must be an array; only a tensor list may leave its gradients to each step")
        if layout is None and all(isinstance(x, Sequence) and not hasattr(x, "shape") for x in lists
                                  if x is not None):
            self.kind = "tensors"
            self._bind_tensors(lists, keeper_role, keeper, group_index)
        else:
            if group_index is not None:
                raise TypeError("group_index is for tensor lists; a layout's segments carry their groups")
            self.kind = "flat" if layout is None else "layout"
            self._bind_flat(lists, keeper_role, keeper, layout)

    # -- binding -----------------------------------------------------------------------------

    def _bind(self, roles: Sequence[str], columns: Sequence[Sequence[Any]], single: bool) -> None:
        """Validate every buffer of every tensor: backend, storage, shapes, layout, aliasing, device.

        ``columns[k]`` holds role ``roles[k]``'s objects, one per tensor (roles in
        :data:`fastradam.storage.ROLES` order, then the master or remainders); a tensor list may leave
        ``grads`` out (given at each step). Names for messages: ``params`` for flat buffers,
        ``params[3]`` for tensor lists."""
        count = len(columns[0])
        width = len(roles)
        objects = [column[i] for i in range(count) for column in columns]  # tensor by tensor
        names = list(roles) if single else [f"{role}[{i}]" for i in range(count) for role in roles]
        stochastic = self.round_seed is not None
        key, fingerprints = _checks_key((*roles, "stochastic") if stochastic else roles, single, objects)
        seen = None if key is None else _CHECKED_BUFFERS.get(key)
        if seen is not None:
            backend, storage, spans = seen
            arrays = backend.as_arrays(objects)
        else:
            backend, storage, arrays, spans = _check_buffers(roles, objects, names, width, single, stochastic)
            if key is not None:
                if len(_CHECKED_BUFFERS) >= _CHECKED_BUFFERS_SIZE:
                    _CHECKED_BUFFERS.clear()
                _CHECKED_BUFFERS[key] = (backend, storage, spans)
            if fingerprints is None:
                fingerprints = [_fingerprint(obj) for obj in objects]
        self.storage: Storage = storage
        self._spans = (names, arrays, spans)
        self.backend = backend
        self.math_dtype = self.storage.math_dtype
        by_role = {role: arrays[k::width] for k, role in enumerate(roles)}
        self.roles = [by_role.get(role) for role in BUFFER_NAMES]
        self.master = by_role.get(MASTER.name, by_role.get(REMAINDERS.name))  # the params' keeper: one or neither
        self._objects, self._object_names = objects, names
        self._fingerprints = fingerprints
        self._order = backend.stream_order(objects)

    def _bind_flat(self, buffers: tuple, keeper_role: str, master: Any, layout: FlatLayout | None) -> None:
        if layout is not None and not isinstance(layout, FlatLayout):
            raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
        if layout is None and len(self._groups.checked) != 1:
            raise ValueError(f"flat buffers take one group of options, got {len(self._groups.checked)}")
        roles = BUFFER_NAMES if master is None else (*BUFFER_NAMES, keeper_role)
        self._bind(roles, [[buffer] for buffer in (*buffers, master)[:len(roles)]], True)
        self.layout = layout
        if layout is not None:
            self.roles = [role[0].reshape(-1) for role in self.roles]
            self.master = None if self.master is None else self.master[0].reshape(-1)
            if self.roles[0].size != layout.size:
                raise ValueError(f"params has {self.roles[0].size} elements but the layout needs {layout.size}")
            self.tensor_groups = layout.arrays.groups
            self._check_group_indices()
            self._launch = self.backend.bind_segments(*self.roles, layout.arrays, master=self.master,
                                                      stochastic=self.storage.stochastic)
        else:
            self.roles = [role[0] for role in self.roles]
            self.master = None if self.master is None else self.master[0]
            self._launch = self.backend.bind_flat(*self.roles, master=self.master, stochastic=self.storage.stochastic)
            # the one-row tables a host step refills in place (a launch copies row 0 by value)
            self._floats = np.empty((1, len(SCALAR_FLOATS)), dtype=self.math_dtype)
            self._ints = np.empty((1, len(SCALAR_INTS)), dtype=np.int32)

    def _bind_tensors(self, lists: tuple, keeper_role: str, masters: Any, group_index: Any) -> None:
        everything = tuple(x for x in lists if x is not None) + (() if masters is None else (masters,))
        if not all(isinstance(x, Sequence) for x in everything):
            raise TypeError(f"params, grads, exp_avg, exp_avg_sq (and {keeper_role}) must be sequences of arrays")
        count = len(lists[0])
        for name, x in zip([n for n, x in zip(BUFFER_NAMES, lists) if x is not None] + [keeper_role], everything):
            if len(x) != count:
                raise ValueError(f"{name} has {len(x)} tensors but params has {count}")
        self.layout = None
        self.tensor_groups = (np.zeros(count, dtype=np.int64) if group_index is None
                              else check_indices("group_index", group_index, count))
        self._check_group_indices()
        self.count = count
        if count == 0:
            self.backend, self.roles, self.master, self._objects, self._fingerprints = None, [[]] * 4, None, [], []
            self._order = None
            return
        present = [(name, list(x)) for name, x in zip(BUFFER_NAMES, lists) if x is not None]
        present += [] if masters is None else [(keeper_role, list(masters))]
        self._bind([name for name, _ in present], [column for _, column in present], False)
        self._launch = self.backend.bind_tensors(*self.roles, master=self.master, stochastic=self.storage.stochastic)

    def _check_group_indices(self) -> None:
        """Every tensor's group exists; then the tables of a step whose tensors share one step number:
        the groups in use, each tensor's row among them, and the all-active mask."""
        groups = self.tensor_groups
        if groups.size and groups.max() >= len(self._groups.checked):
            bad = int(np.argmax(groups >= len(self._groups.checked)))
            raise ValueError(f"tensor {bad} is in group {int(groups[bad])}, but only {len(self._groups.checked)} "
                             "groups were given")
        self._group_ids, group_row = np.unique(groups, return_inverse=True)
        self._group_ids = self._group_ids.tolist()
        self._group_row = group_row.astype(np.int32).reshape(-1)
        self._group_row.flags.writeable = False
        self._all_active = np.ones(groups.size, dtype=bool)
        self._all_active.flags.writeable = False

    # -- stepping ----------------------------------------------------------------------------

    def _check_bound(self) -> None:
        """ValueError naming a bound buffer that was resized, re-pointed or made read-only since binding."""
        if [_fingerprint(obj) for obj in self._objects] == self._fingerprints:
            return
        for name, obj, before in zip(self._object_names, self._objects, self._fingerprints):
            if _fingerprint(obj) != before:
                raise ValueError(f"{name} changed after the plan was bound (shape, memory or writeability: "
                                 f"was {before}, now {_fingerprint(obj)}): build a new StepPlan")

    def _options(self, groups: Sequence[Mapping[str, Any]] | None, lr: Any) -> list[GroupOptions]:
        """The groups of this step: the bound ones, or ``groups`` checked where they changed (kept by
        :meth:`_ready` once every other check passed), with ``lr`` (when given) as every group's lr."""
        checked = self._groups.checked if groups is None else self._groups.check(groups)
        self._pending = None if groups is None else (groups, checked)
        if lr is None:
            return checked
        lr = non_negative("lr", lr)
        return [dataclasses.replace(group, lr=lr) for group in checked]

    def _ready(self, launch: Callable[[], Any]) -> Callable[[], Any]:
        """``launch`` once every check of a step passed: new groups are kept, and the launch first
        does what the backend asks of a bound launch (follow torch's CUDA stream)."""
        if self._pending is not None:
            self._groups.keep(*self._pending)
            self._pending = None
        order = self._order
        if order is None:
            return launch

        def ordered() -> Any:
            order()
            return launch()
        return ordered

    def step(self, step: Any = None, *, steps: Any = None, has_grad: Any = None, lr: Any = None,
             groups: Sequence[Mapping[str, Any]] | None = None, grads: Sequence[Any] | None = None,
             lrs: Sequence[Any] | None = None, grad_scale: float = 1.0, found_inf: Any = None,
             max_grad_norm: float | None = None, norm_type: float = 2.0, grad_norm: Any = None) -> Any:
        """One RAdam step in place over the bound buffers (see :func:`fastradam.fused_step`).

        Flat buffers take ``step`` (an int, or on CUDA a 0-d device array: the capturable step);
        layouts and tensor lists take ``steps`` (one int per tensor; for a layout on CUDA also a
        1-D device array, read there, with ``lrs``: each group's lr, a float or a 0-d device
        array) and ``has_grad``. ``lr`` replaces every group's learning rate for this step;
        ``groups`` replaces the groups' options (re-checked only where they changed); a tensor
        list's ``grads`` replaces its gradients for this step (checked as at binding; ``None``
        where ``has_grad`` is False). Every check runs before any byte is written.

        ``max_grad_norm`` clips the gradients by their global norm inside the step
        (:mod:`fastradam.clipping`): a read-only pre-pass computes the norm of the unscaled active
        gradients (``norm_type``: a p > 0 or inf), and the step multiplies each gradient by
        ``min(1, max_grad_norm / (norm + 1e-6)) / grad_scale``; the norm is returned (a float; on CUDA
        a 0-d float64 device array, never synchronised). ``grad_norm`` gives a norm computed
        before (:meth:`grad_norm`, combined over plans or ranks): then no pre-pass runs. With
        ``check_finite`` the norm is the finite check: a NaN/inf norm skips the step.
        """
        return self.prepare(step, steps=steps, has_grad=has_grad, lr=lr, groups=groups, grads=grads, lrs=lrs,
                            grad_scale=grad_scale, found_inf=found_inf, max_grad_norm=max_grad_norm,
                            norm_type=norm_type, grad_norm=grad_norm)()

    def grad_norm(self, norm_type: float = 2.0, *, has_grad: Any = None, grads: Sequence[Any] | None = None,
                  grad_scale: float = 1.0) -> Any:
        """The global norm of the unscaled active gradients (``grad / grad_scale``; ``has_grad`` and a
        tensor list's ``grads`` as for :meth:`step`): the clipping pre-pass alone, nothing written.
        A float on the host; on CUDA a 0-d float64 device array (no synchronisation). Pass it to
        :meth:`step` as ``grad_norm=`` (after combining the norms of several plans or ranks,
        :func:`fastradam.clipping.combine_norms`) to clip without a second read."""
        clip = Clip(None, check_norm_type(norm_type), 1.0 / check_grad_scale(grad_scale))
        if self.kind == "flat":
            return self._prepare(1, None, None, None, None, None, None, grad_scale, None, clip)()
        return self._prepare(None, np.ones(self.tensor_groups.size, dtype=np.int64), has_grad, None, None, grads, None,
                             grad_scale, None, clip)()

    def _clip(self, max_grad_norm: Any, norm_type: Any, grad_norm: Any, grad_scale: float) -> Clip | None:
        """The checked clipping request of a step (None without ``max_grad_norm``)."""
        if max_grad_norm is None and grad_norm is None and type(norm_type) is float and norm_type == 2.0:
            return None  # the common step, without the checks below
        norm_type = check_norm_type(norm_type)
        if max_grad_norm is None:
            if grad_norm is not None:
                raise TypeError("grad_norm= is the norm to clip by: pass max_grad_norm= with it")
            return None
        max_norm = check_max_norm(max_grad_norm)
        if grad_norm is not None:
            grad_norm = self._check_grad_norm(grad_norm)
        return Clip(max_norm, norm_type, 1.0 / grad_scale, grad_norm)

    def _check_grad_norm(self, grad_norm: Any) -> Any:
        """A given norm: a real number (or 0-d NumPy array) >= 0, NaN or inf; or a 0-d float device
        array of the plan's backend, which reads it there."""
        if isinstance(grad_norm, np.ndarray) and grad_norm.shape == ():
            grad_norm = grad_norm.item()
        if isinstance(grad_norm, numbers.Real) and not isinstance(grad_norm, (bool, np.bool_)):
            value = float(grad_norm)
            if value < 0.0:
                raise ValueError(f"grad_norm must be >= 0 (or NaN/inf), got {value!r}")
            return value
        device = getattr(self.backend, "CAPTURABLE", False)
        if not device or not is_device_array(grad_norm) or \
                backend_for(("grad_norm",), (grad_norm,)).module_name != self.backend.__name__:
            raise TypeError(f"grad_norm must be a real number{' or a 0-d device array' if device else ''}, "
                            f"got {type(grad_norm).__name__}")
        return self.backend.check_norm(grad_norm)

    def prepare(self, step: Any = None, *, steps: Any = None, has_grad: Any = None, lr: Any = None,
                groups: Sequence[Mapping[str, Any]] | None = None, grads: Sequence[Any] | None = None,
                lrs: Sequence[Any] | None = None, grad_scale: float = 1.0, found_inf: Any = None,
                max_grad_norm: float | None = None, norm_type: float = 2.0,
                grad_norm: Any = None) -> Callable[[], Any]:
        """Every check of :meth:`step` (same arguments), and the launch it would make, not yet made
        (calling it returns what :meth:`step` returns).

        Callers that step several plans as one (the torch drop-in: one plan per device and dtype)
        prepare them all first, so a bad argument to the last leaves the first unwritten too.
        """
        grad_scale = check_grad_scale(grad_scale)
        clip = self._clip(max_grad_norm, norm_type, grad_norm, grad_scale)
        return self._prepare(step, steps, has_grad, lr, groups, grads, lrs, grad_scale, found_inf, clip)

    def _prepare(self, step: Any, steps: Any, has_grad: Any, lr: Any, groups: Sequence[Mapping[str, Any]] | None,
                 grads: Sequence[Any] | None, lrs: Sequence[Any] | None, grad_scale: float, found_inf: Any,
                 clip: Clip | None) -> Callable[[], Any]:
        if self.kind == "flat":
            if steps is not None or has_grad is not None or grads is not None or lrs is not None:
                raise TypeError("flat buffers take step= (and lr=), not steps=, has_grad=, grads= or lrs=")
            return self._prepare_flat(step, lr, groups, grad_scale, found_inf, clip)
        if step is not None:
            raise TypeError(f"a {'layout' if self.kind == 'layout' else 'tensor list'} takes steps= (one per "
                            "tensor), not step=")
        if grads is not None and self.kind != "tensors":
            raise TypeError("grads= rebinds a tensor list's gradients; a layout's gradients are its flat buffer")
        checked = self._options(groups, lr)
        count = self.tensor_groups.size
        active = self._all_active if has_grad is None else check_mask("has_grad", has_grad, count)
        all_active = active is self._all_active or bool(active.all())
        if self.kind == "layout" and self.backend.CAPTURABLE and is_device_array(steps):
            return self._prepare_layout_capturable(steps, active, checked, lrs, grad_scale, found_inf, clip)
        if lrs is not None:
            raise TypeError("lrs= goes with device step counts (a capturable layout step); pass lr= or groups=")
        steps, first_step, last_step = check_steps("steps", steps, count, active, all_active)
        if self.kind == "tensors" and count == 0:
            return self._ready(_nothing if clip is None else functools.partial(_no_norm, clip))
        if grads is None and self.kind == "tensors" and self.roles[1] is None:
            raise TypeError("this plan was bound without gradients: pass grads= at each step")
        fresh = None if grads is None else self._fresh_grads(grads, active)
        self._check_bound()
        found_inf = _check_found_inf(found_inf, self.backend)
        if last_step == 0:  # no tensor is active: nothing to read or write
            return self._ready(_nothing if clip is None else functools.partial(_no_norm, clip))
        if first_step == last_step:  # every active tensor at one step (the common case): a row per group
            rows = [group_step_scalars(checked[g], first_step, self.round_seed) for g in self._group_ids]
            tensor_row = self._group_row if all_active else np.where(active, self._group_row, -1).astype(np.int32)
        else:
            rows, tensor_row = scalar_rows(checked, self.tensor_groups, steps, active, self.round_seed)
        floats, ints = pack_rows(rows, self.math_dtype, grad_scale)
        extra = {} if clip is None else {"clip": clip}
        if self.kind == "layout":
            return self._ready(functools.partial(self._launch, tensor_row, floats, ints, found_inf, self.check_finite,
                                                 **extra))
        return self._ready(functools.partial(self._launch, tensor_row, floats, ints, found_inf, self.check_finite,
                                             grads=fresh, **extra))

    def _fresh_grads(self, grads: Sequence[Any], active: np.ndarray) -> list[Any]:
        """New gradients for the bound tensors (``None`` where inactive), checked as at binding: one
        backend and device, one storage, each its parameter's shape, C-contiguous, sharing no memory
        with a written buffer. Messages name ``grads[i]``; names are made only for an error."""
        if not isinstance(grads, Sequence) or len(grads) != self.count:
            raise ValueError(f"grads must be a sequence of {self.count} arrays, one per tensor")
        used = np.flatnonzero(active).tolist()
        objects = [grads[i] for i in used]
        missing = next((i for i, obj in zip(used, objects) if obj is None), None)
        if missing is not None:
            raise TypeError(f"grads[{missing}] is None, but has_grad is True there")
        fresh: list[Any] = [None] * self.count
        if not used:
            return fresh
        if not all(type(obj) is np.ndarray for obj in objects) or self.backend.__name__ != _NUMPY_BACKEND:
            owner = backend_for([f"grads[{i}]" for i in used], objects)
            if owner.module_name != self.backend.__name__:
                raise TypeError(f"grads are {owner.name} arrays, but the plan's buffers are not")
        storage = self.backend.storage_of(objects[0])
        for i, obj in zip(used, objects):
            if self.backend.storage_of(obj) != storage:
                raise TypeError(f"grads[{i}] has dtype {self.backend.storage_of(obj)} but grads[{used[0]}] has "
                                f"{storage}: all tensors must share one storage per role")
        if self.roles[1] is not None and storage != self.storage.grads:
            raise TypeError(f"grads[{used[0]}] has dtype {storage} but the plan was bound with "
                            f"{self.storage.grads} grads")
        s = self.storage
        check_storage((s.params, storage, s.moments, s.moments), ("params", f"grads[{used[0]}]", "exp_avg",
                      "exp_avg_sq"), "float32" if s.master else None, MASTER.name,
                      "int16" if s.remainders else None, s.stochastic)
        arrays = self.backend.as_arrays(objects)
        written, written_starts = self._written_spans()
        params = self.roles[0]
        for i, array, (start, end) in zip(used, arrays, address_spans(arrays)):
            if array.shape != params[i].shape or not array.flags.c_contiguous:
                check_buffers([params[i], array], [f"params[{i}]", f"grads[{i}]"], (False, False))  # raises
            index = bisect.bisect_right(written_starts, start) - 1
            for written_start, written_end, written_name in written[max(index, 0):index + 2]:
                if start < written_end and written_start < end:
                    raise ValueError(f"grads[{i}] and {written_name} share memory: the buffers must be distinct")
            fresh[i] = array
        self.backend.check_devices([params[0], *arrays], ["params[0]", *(f"grads[{i}]" for i in used)])
        return fresh

    def _written_spans(self) -> tuple[list[tuple[int, int, str]], list[int]]:
        """The bound written buffers' address spans ``(start, end, name)``, sorted, and their starts
        (what gradients given at a step must not overlap); computed on first use."""
        if self._written is None:
            names, arrays, spans = self._spans
            spans = address_spans(arrays) if spans is None else spans
            written = sorted((start, end, name) for (start, end), name in zip(spans, names)
                             if end > start and not name.startswith("grads"))
            self._written = written, [start for start, _, _ in written]
        return self._written

    def _prepare_layout_capturable(self, steps: Any, active: np.ndarray, groups: list[GroupOptions],
                                   lrs: Sequence[Any] | None, grad_scale: float, found_inf: Any,
                                   clip: Clip | None) -> Callable[[], Any]:
        """A layout step whose step counts live on the device (CUDA, capturable): one launch reads them."""
        self._refuse_device_steps_with_stochastic_rounding()
        lrs = [group.lr for group in groups] if lrs is None else list(lrs)
        if len(lrs) != len(groups):
            raise ValueError(f"lrs has {len(lrs)} entries but there are {len(groups)} groups")
        if any(group.schedule is not None for group in groups):
            raise ValueError("schedule needs a host step: with device step counts, pass the scheduled lrs")
        self._check_bound()
        found_inf = _check_found_inf(found_inf, self.backend)
        segment_group = np.where(active, self.tensor_groups, -1).astype(np.int32)
        self.backend.capturable_lrs(lrs, segment_group, [r for r in (*self.roles, self.master) if r is not None])
        return self._ready(functools.partial(
            self.backend.radam_step_segments_capturable, *self.roles, self.layout.arrays, segment_group, steps, groups,
            lrs, master=self.master, grad_scale=grad_scale, found_inf=found_inf, check_finite=self.check_finite,
            **({} if clip is None else {"clip": clip})))

    def _prepare_flat(self, step: Any, lr: Any, groups: Any, grad_scale: float, found_inf: Any,
                      clip: Clip | None) -> Callable[[], Any]:
        device_step = step is not None and not isinstance(step, numbers.Number)
        if not device_step:
            host_step = check_step(step)
            (group,) = self._options(groups, lr)
            self._check_bound()
            found_inf = _check_found_inf(found_inf, self.backend)
            scalars = group_step_scalars(group, host_step, self.round_seed)

            def launch() -> Any:
                pack_row_into(self._floats, self._ints, scalars, grad_scale)
                if clip is None:
                    return self._launch(self._floats, self._ints, found_inf, self.check_finite)
                return self._launch(self._floats, self._ints, found_inf, self.check_finite, clip=clip)
            return self._ready(launch)
        if not self.backend.CAPTURABLE:
            check_step(step)  # raises: a host backend takes only an int step
        self._refuse_device_steps_with_stochastic_rounding()
        device_lr = lr is not None and not isinstance(lr, numbers.Number)
        (group,) = self._options(groups, 0.0 if device_lr else lr)
        if group.schedule is not None:
            raise ValueError("schedule needs a host step: with a device step, pass the scheduled lr as a device array")
        self._check_bound()
        found_inf = _check_found_inf(found_inf, self.backend)
        return self._ready(functools.partial(
            self.backend.radam_step_capturable, *self.roles, step, lr if device_lr else group.lr, group,
            master=self.master, grad_scale=grad_scale, found_inf=found_inf, check_finite=self.check_finite,
            **({} if clip is None else {"clip": clip})))

    def _refuse_device_steps_with_stochastic_rounding(self) -> None:
        if self.round_seed is not None:
            raise ValueError("stochastic rounding needs host step numbers (its key is hashed from the step on the "
                             "host): pass the step as an int, or round to nearest without stochastic_round_seed")


def _nothing() -> None:
    """The launch of a step with nothing to do."""


def _no_norm(clip: Clip) -> Any:
    """The norm of a step with no active gradient: 0, or the norm it was given."""
    return 0.0 if clip.norm is None else clip.norm
