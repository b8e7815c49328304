"""The PyTorch drop-in: ``fastradam.torch.RAdam`` for ``torch.optim.RAdam``, one fused step per device/dtype.

Change ``torch.optim.RAdam(...)`` to ``fastradam.torch.RAdam(...)``: same constructor, param
groups, ``state_dict`` format and training trajectory; the flat buffers live in
:mod:`fastradam.torch_buffers`.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable

import numpy as np
import torch

from fastradam.flavours import PRESETS, Flavour, FlavourLike
from fastradam.schedules import KerasWarmup
from fastradam.torch_buffers import FlatBucket, check_parameter, is_dtensor
from fastradam.options import DEFAULTS, CheckedGroups, check_group

__all__ = ["RAdam"]

#: Group keys torch.optim.RAdam keeps that fastradam does not use (``foreach`` is ignored).
TORCH_ONLY_DEFAULTS = {"foreach": None, "capturable": False, "differentiable": False}
#: fastradam's own group keys, left out of ``state_dict`` while they hold these defaults.
EXTRA_DEFAULTS = {name: DEFAULTS[name] for name in ("eps_root", "flavour", "schedule")}


def _options(group: dict) -> dict:
    """A torch param group as fastradam group options (a host lr unless the group is capturable)."""
    options = {key: group[key] for key in DEFAULTS}
    lr = options["lr"]
    if isinstance(lr, torch.Tensor) and not group["capturable"]:
        options["lr"] = float(lr)
    return options


def _validatable(options: dict) -> dict:
    """Options as ``check_group`` takes them: a capturable group's lr may be a 0-d floating tensor
    (read on the device at each step), checked here and validated through a placeholder."""
    lr = options["lr"]
    if not isinstance(lr, torch.Tensor):
        return options
    if lr.dim() != 0 or not lr.is_floating_point():
        raise ValueError(f"a tensor lr must be a 0-d floating tensor, got shape {tuple(lr.shape)} and {lr.dtype}")
    return {**options, "lr": 0.0}


def _encode_extras(group: dict) -> None:
    """``flavour``/``schedule`` as plain values (``torch.load(weights_only=True)`` reads them); defaults dropped."""
    if group.get("eps_root", 0.0) == 0.0:
        group.pop("eps_root", None)
    flavour = group.pop("flavour", "torch")
    if isinstance(flavour, Flavour):
        preset = next((name for name, f in PRESETS.items() if f == flavour), None)
        flavour = preset if preset is not None else {f: getattr(flavour, f) for f in flavour.__dataclass_fields__}
    if flavour != "torch":
        group["flavour"] = flavour
    schedule = group.pop("schedule", None)
    if schedule is not None:
        group["schedule"] = {f: getattr(schedule, f) for f in schedule.__dataclass_fields__}


def _decode_extras(group: dict) -> dict:
    """The inverse of :func:`_encode_extras`, on a copy; missing keys take their defaults (as torch's)."""
    group = dict(group)
    for key, default in {**TORCH_ONLY_DEFAULTS, **EXTRA_DEFAULTS, "maximize": False,
                         "decoupled_weight_decay": False}.items():
        group.setdefault(key, default)
    if isinstance(group["flavour"], dict):
        group["flavour"] = Flavour(**group["flavour"])
    if isinstance(group["schedule"], dict):
        group["schedule"] = KerasWarmup(**group["schedule"])
    return group


class RAdam(torch.optim.Optimizer):
    r"""``torch.optim.RAdam`` with one fused, in-place step per device and dtype.

    Same constructor as ``torch.optim.RAdam`` (``lr, betas, eps, weight_decay,
    decoupled_weight_decay, foreach, maximize, capturable, differentiable``) plus fastradam's
    ``eps_root`` (optax's), ``flavour`` and ``schedule`` group options (see :func:`fastradam.fused_step`).

    Buffers
        On construction (and on :meth:`add_param_group`) the parameters of each (device,
        dtype) are copied into one flat buffer (a :class:`~fastradam.layout.FlatLayout`,
        64-element aligned segments, in param-group order) and each ``p.data`` becomes a view
        of its segment: the Parameter objects, their values, ``requires_grad`` and autograd
        are unchanged, and ``model.state_dict()`` still works (its tensors are views too, so
        ``torch.save`` of a *part* of the model stores the whole flat storage). ``exp_avg``,
        ``exp_avg_sq`` and ``step`` (float32 0-d, on the CPU unless ``capturable``) are views of
        flat buffers beside it; they must be changed in place, never replaced. Moving a
        parameter afterwards (``model.to(...)``, ``.double()``, assigning ``p.data``) is
        detected at the next :meth:`step`, which raises: build the optimizer after moving the
        model. CPU buffers reach Numba as zero-copy NumPy views; CUDA buffers reach the CUDA
        backend as CuPy views made once, and every launch runs on torch's current stream.

    Gradients
        * Each (device, dtype) buffer is stepped through :class:`fastradam.StepPlan` objects bound
          once (validation, tables), so a step checks only what changed: gradients, options,
          that the parameters were not moved.
        * ``zero_grad(set_to_none=False)`` points every gradient at a view of a flat gradient
          buffer (allocated then) and zeroes it with one memset; autograd then accumulates into
          those views in place, and the step is one layout launch per buffer, with no copy. (The
          gradient tensor objects change identity at the first such call; their values are torch's.)
        * Fresh gradients (torch's default ``zero_grad()`` sets them to ``None``, and autograd
          allocates new ones): on CUDA, and on the CPU for buffers of at most
          ``torch_buffers.GATHER_BELOW`` elements, they are first copied into the flat gradient
          buffer by one ``_foreach_copy_`` (``p.grad`` left as it is; the buffer, one more copy of
          the parameters' size, is kept), then the layout launch runs; larger CPU buffers (and
          FSDP2 shards) take the tensor-list launch, one launch through an address table over the
          parameter/moment views and the gradients as they are, no copy (on 16M float32 the copy
          moves 8 of the step's 28 bytes per element). ``pytest bench/test_bench_wrapper.py --full``
          and ``bench/host_overhead.py`` measure them.
        * A parameter whose ``p.grad`` is ``None`` is skipped and its ``step`` does not
          advance, as in torch; its state appears at its first gradient.

    State
        :meth:`state_dict` has exactly ``torch.optim.RAdam``'s format (per parameter
        ``step``, ``exp_avg``, ``exp_avg_sq``; the same param-group keys, plus ``flavour`` /
        ``schedule`` only when they differ from the defaults, as plain values), so a checkpoint
        of either optimizer loads into the other. :meth:`load_state_dict` validates, then
        copies the incoming tensors into the flat buffers (it never aliases them).

    Distributed (``tests/test_distributed.py``, gloo on the CPU; the same code path with NCCL)
        * ``ZeroRedundancyOptimizer(params, optimizer_class=fastradam.torch.RAdam, ...)``: each
          rank's instance packs only its shard; ``consolidate_state_dict`` gives torch's format.
          ``parameters_as_bucket_view=True`` is refused at the first step (ZeRO re-points the
          parameters into its own buckets after this optimizer did; keep the default ``False``).
        * FSDP2 (``fully_shard``): DTensor parameters get buffers over their *local* shards. The
          parameters are not re-pointed (FSDP2 all-gathers from its own padded shard storage):
          each step is one tensor-list launch over the local parameter/gradient shards with the
          moments in flat buffers. Their state entries are DTensors (placements of the parameter)
          over the moment views, so ``torch.distributed.checkpoint`` saves and reshards them.
        * DDP ``gradient_as_bucket_view=True``: gradients that view another buffer are zeroed in
          place by ``zero_grad(set_to_none=False)``, never re-pointed, and stepped as they are.

    Not supported: sparse gradients (RuntimeError at the step), complex or other non-float
    dtypes (TypeError), ``differentiable=True`` (NotImplementedError), ``capturable`` on the
    CPU (ValueError). ``foreach`` is accepted and ignored. ``capturable=True`` keeps the step
    counts on the device (CUDA graphs): one launch per buffer reads them, and any tensor lr,
    there; fresh gradients are first copied into the flat gradient buffer (one ``_foreach_copy_``).
    As with torch, take one step before capturing (it builds the state and the device tables).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        eps_root: float = 0.0,
        flavour: FlavourLike = "torch",
        schedule: KerasWarmup | None = None,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "maximize": maximize,
                    "foreach": foreach, "capturable": capturable,
                    "decoupled_weight_decay": decoupled_weight_decay, "differentiable": differentiable,
                    "eps_root": eps_root, "flavour": flavour, "schedule": schedule}
        self._check_group(defaults)
        self._capturable = bool(capturable)
        self._buckets: list[FlatBucket] = []
        self._group_checks: CheckedGroups | None = None
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        self._rebuild()

    # -- groups and buffers ------------------------------------------------------------------

    @staticmethod
    def _check_group(group: dict) -> None:
        if group["differentiable"]:
            raise NotImplementedError("fastradam.torch.RAdam does not support differentiable=True "
                                      "(use torch.optim.RAdam for a differentiable step)")
        if group["capturable"] and group["schedule"] is not None:
            raise ValueError("schedule needs a host step; with capturable=True pass the scheduled lr instead")
        check_group(_validatable(_options(group)))

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, then the parameters move into the flat buffers."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            if bool(group["capturable"]) != self._capturable:
                raise ValueError("capturable must be the same for every param group")
            for j, p in enumerate(group["params"]):
                check_parameter(p, self._name(len(self.param_groups) - 1, j))
                if self._capturable and p.device.type != "cuda":
                    raise ValueError(f"capturable=True needs CUDA parameters; {self._name(len(self.param_groups) - 1, j)} "
                                     f"is on {p.device}")
        except Exception:
            self.param_groups.pop()
            raise
        if not self._building:
            self._rebuild()

    def _name(self, group_index: int, position: int) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        if names:
            return f"parameter {names[position]!r}"
        return f"param_groups[{group_index}]['params'][{position}]"

    def _rebuild(self) -> None:
        """(Re)pack every parameter into one bucket per (device, dtype), carrying values and state over."""
        grad_views = any(bucket.grads_adopted for bucket in self._buckets)
        members: dict[tuple, tuple[list, list]] = {}
        names = {}
        for g, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                params, groups = members.setdefault((p.device, p.dtype, is_dtensor(p)), ([], []))
                params.append(p)
                groups.append(g)
                names[p] = self._name(g, j)
        describe = names.__getitem__
        buckets = [FlatBucket(params, groups, capturable=self._capturable, describe=describe, sharded=key[2])
                   for key, (params, groups) in members.items()]
        with torch.no_grad():
            for bucket in buckets:
                bucket.adopt(self.state, grad_views)
        self._buckets = buckets

    # -- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One RAdam step of every parameter with a gradient; returns ``closure()``'s loss, if given.

        Every check (hyperparameters, parameters still in place, gradients) runs before any
        buffer or step count is written.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [_options(group) for group in self.param_groups]
        checked = [_validatable(options) for options in groups]
        if self._group_checks is None or len(self._group_checks.checked) != len(checked):
            self._group_checks = CheckedGroups(checked)  # every group checked, with or without gradients
        else:
            self._group_checks.keep(checked, self._group_checks.check(checked))
        lrs = [options["lr"] for options in groups]
        gradients = [bucket.check_gradients() for bucket in self._buckets]
        steps = [bucket.prepare(active, grads, checked, lrs) for bucket, (active, grads) in zip(self._buckets, gradients)]
        for bucket, (active, _), step in zip(self._buckets, gradients, steps):
            new = active & ~bucket.has_state
            if new.any():
                for i in np.flatnonzero(new):
                    self.state[bucket.params[i]] = bucket.state_entry(i)
                bucket.has_state |= new
            step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; ``set_to_none=False`` zeroes one flat gradient buffer per device/dtype
        (and makes the gradients views of it, so the next step copies nothing)."""
        with torch.no_grad():
            for bucket in self._buckets:
                bucket.zero_grad(set_to_none)

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.RAdam's ``state_dict`` (tensors are live views, as torch's are live tensors)."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            _encode_extras(group)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of ``torch.optim.RAdam``: checked first, then copied in."""
        saved_groups = [_decode_extras(group) for group in state_dict["param_groups"]]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        ids_to_params = {}
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size "
                                 "of optimizer's group")
            self._check_group({**saved, "capturable": self._capturable, "differentiable": False})
            ids_to_params.update(zip(saved["params"], group["params"]))
        for key, entry in state_dict["state"].items():
            p = ids_to_params.get(key)
            if p is None:
                continue
            for name in ("exp_avg", "exp_avg_sq"):
                value = entry.get(name) if isinstance(entry, dict) else None
                if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                    raise ValueError(f"state of parameter {key}: {name} must be a tensor of shape "
                                     f"{tuple(p.shape)}, got {getattr(value, 'shape', type(value).__name__)}")
            step = entry.get("step")
            if not (isinstance(step, (torch.Tensor, numbers.Real)) and torch.as_tensor(step).numel() == 1):
                raise ValueError(f"state of parameter {key}: step must be a number or a one-element tensor")
        super().load_state_dict({**state_dict, "param_groups": saved_groups})
        for group in self.param_groups:
            group["capturable"] = self._capturable
        with torch.no_grad():
            for bucket in self._buckets:
                bucket.load_state(self.state)
