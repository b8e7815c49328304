"""The PyTorch drop-in: ``fastradam.torch.RAdam`` for ``torch.optim.RAdam``, one fused step per device/dtype.

Change ``torch.optim.RAdam(...)`` to ``fastradam.torch.RAdam(...)``: same constructor, param
groups, ``state_dict`` format and training trajectory; the flat buffers live in
:mod:`fastradam.torch.buckets`.
"""

from __future__ import annotations

from operator import is_, itemgetter
from typing import Any, Callable, Iterable

import numpy as np
import torch

from fastradam.flavours import PRESETS, Flavour, FlavourLike
from fastradam.schedules import KerasWarmup
from fastradam.torch.buckets import (Changes, FlatBucket, StateEntry, check_parameter, check_state_entry,
                                     counts_changes, is_dtensor, memory_overlap)
from fastradam.options import DEFAULTS, CheckedGroups, check_group

__all__ = ["RAdam"]

#: Group keys torch.optim.RAdam keeps that fastradam does not use (``foreach`` is ignored).
TORCH_ONLY_DEFAULTS = {"foreach": None, "capturable": False, "differentiable": False}
#: fastradam's own group keys, left out of ``state_dict`` while they hold these defaults.
EXTRA_DEFAULTS = {name: DEFAULTS[name] for name in ("eps_root", "flavour", "schedule")}
_PARAMS = itemgetter("params")


def _options(group: dict, where: str = "") -> dict:
    """A torch param group as fastradam group options (a host lr unless the group is capturable);
    ``where`` (``"groups[1]."``) prefixes the option's name in messages."""
    options = {key: group[key] for key in DEFAULTS}
    lr = options["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where and where + 'lr: '}Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if lr.is_complex():
            raise TypeError(f"{where}lr must be a real number, got a {lr.dtype} tensor")
        if not group["capturable"]:
            options["lr"] = float(lr)
    return options


@counts_changes("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "remove", "pop",
                "clear", "sort", "reverse")
class ParamList(list):
    """A param group's ``params``: a list that counts its changes, so a step notices a parameter
    appended (removed, replaced) by hand without looking at every parameter."""


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
        ``exp_avg_sq`` and ``step`` (0-d; float32, or float64 under
        ``torch.set_default_dtype(torch.float64)`` at construction, as torch's; on the CPU unless
        ``capturable``) are views of flat buffers beside it. Moving a parameter afterwards
        (``model.to(...)``, ``.double()``, assigning ``p.data``) is detected at the next
        :meth:`step`, which raises: build the optimizer after moving the model. Two Parameter
        objects over overlapping memory (tied weights as two Parameters of one storage, views of
        one tensor) are refused: packed, they would stop sharing it (tie them as one Parameter).
        CPU buffers reach Numba as zero-copy NumPy views; CUDA buffers reach the CUDA backend as
        CuPy views made once, and every launch runs on torch's current stream.

    Changed by hand (state entries and group parameter lists count their changes, and each step
    compares the identities of the state's entries and the groups' lists: C loops, no tensor work)
        * ``optimizer.state`` cleared, replaced (``= defaultdict(dict)``) or an entry deleted: those
          parameters start again from zero moments and step 0 at their next gradient, as torch's.
        * A state entry or tensor replaced (``state[p] = {...}``, ``state[p]["exp_avg"] = t``;
          ZeroRedundancyOptimizer's ``load_state_dict`` assigns entries so): the next step checks
          them (shapes), copies their values into the flat buffers and points the entry back at its
          views, so the step uses ``t``'s values, as torch's does, though ``t`` itself is not
          updated afterwards (torch's would be, in place). Copying in rather than refusing keeps
          torch's own code that assigns state working. The entries are :class:`StateEntry` and the
          groups' ``params`` :class:`ParamList` (a dict and a list that count their changes);
          :meth:`state_dict` gives plain dicts.
        * Parameters appended to (removed from, replaced in) ``param_groups[i]["params"]``: checked,
          then every parameter is repacked at the next :meth:`step` or :meth:`zero_grad`, as
          :meth:`add_param_group` does, and trained as torch trains them. A parameter listed twice
          is refused (``some parameters appear in more than one parameter group``; twice in one
          group, which torch warns about and steps twice: ``... duplicate parameters``).
        * ``copy.deepcopy(optimizer)``, pickling, ``torch.save(optimizer)`` + ``torch.load``: the
          copy repacks its copies of the parameters into buffers of its own, so
          ``copy.deepcopy((model, optimizer))`` gives an optimizer of the copied model, and an
          optimizer copied alone trains its own copies, as torch's. ``copy.copy`` shares the groups,
          state and buffers, as torch's shares the groups and state.

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
          ``buckets.GATHER_BELOW`` elements, they are first copied into the flat gradient
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
    CPU (ValueError), a parameter listed twice or two over overlapping memory (ValueError).
    ``foreach`` is accepted and ignored. ``capturable=True`` keeps the step counts on the device
    (CUDA graphs): one launch per buffer reads them, and any tensor lr, there; fresh gradients are
    first copied into the flat gradient buffer (one ``_foreach_copy_``).
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
        self._check_params()  # once, over every group
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
        try:
            self._check_group(self.param_groups[-1])
            if not self._building:
                self._check_params()
        except Exception:
            self.param_groups.pop()
            raise
        if not self._building:
            self._rebuild()

    def _check_params(self) -> None:
        """Every parameter of every group, checked before any is packed: a supported leaf tensor,
        listed once, sharing no memory with another (packing would stop them sharing it)."""
        seen: dict[torch.Tensor, tuple[int, int]] = {}
        for g, group in enumerate(self.param_groups):
            if bool(group["capturable"]) != self._capturable:
                raise ValueError("capturable must be the same for every param group")
            params = group["params"]
            if not isinstance(params, (list, tuple)):
                raise TypeError(f"param_groups[{g}]['params'] must be a list of tensors, got {type(params).__name__}")
            for j, p in enumerate(params):
                where = self._name(g, j)
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"optimizer can only optimize Tensors, but one of the params is "
                                    f"{torch.typename(p)} ({where})")
                if not (p.is_leaf or p.retains_grad):
                    raise ValueError(f"can't optimize a non-leaf Tensor ({where})")
                check_parameter(p, where)
                if self._capturable and p.device.type != "cuda":
                    raise ValueError(f"capturable=True needs CUDA parameters; {where} is on {p.device}")
                first = seen.setdefault(p, (g, j))
                if first[0] == g and first != (g, j):
                    raise ValueError(f"optimizer contains a parameter group with duplicate parameters: {where} is "
                                     f"{self._name(*first)} again (torch.optim.RAdam warns and steps it twice; "
                                     "fastradam.torch.RAdam refuses it): list each parameter once")
                if first[0] != g:
                    raise ValueError(f"some parameters appear in more than one parameter group: {where} is "
                                     f"{self._name(*first)}")
        params = list(seen)
        overlap = memory_overlap(params)
        if overlap is not None:
            first, second = (self._name(*seen[params[k]]) for k in overlap)
            raise ValueError(
                f"{first} and {second} share memory (two Parameter objects over one storage, or views of one "
                "tensor): fastradam.torch.RAdam copies each parameter into its own segment of a flat buffer, "
                "which would stop them sharing it; tie them as one Parameter object "
                "(e.g. decoder.weight = encoder.weight) or optimize the tensor they view")

    def _name(self, group_index: int, position: int) -> str:
        group = self.param_groups[group_index]
        names = group.get("param_names")
        if names and position < len(names):
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
        entries = [bucket.read_state(self.state) for bucket in buckets]  # all checked before any parameter moves
        with torch.no_grad():
            for bucket, checked in zip(buckets, entries):
                bucket.adopt(self.state, checked, grad_views)
        self._buckets = buckets
        self._watch()

    # -- following changes made by hand --------------------------------------------------------

    def _watch(self) -> None:
        """Remember the groups' parameter lists and the state entries as they are now: each step
        compares their identities (and :class:`Changes`) and follows what changed (:meth:`_follow`)."""
        for group in self.param_groups:
            if type(group["params"]) is not ParamList:
                group["params"] = ParamList(group["params"])
        self._group_lists = list(map(_PARAMS, self.param_groups))
        self._group_params = [list(params) for params in self._group_lists]  # held: their ids stay theirs
        self._group_ids = [list(map(id, params)) for params in self._group_params]
        self._state_entries = list(self.state.values())
        self._changes = Changes.count

    def _changed(self, state: bool = True) -> bool:
        """Whether anything :meth:`_watch` remembered (the groups, and with ``state`` the state) may
        have changed: identities and lengths only, compared in C loops."""
        if (Changes.count != self._changes or len(self.param_groups) != len(self._group_lists)
                or not all(map(is_, map(_PARAMS, self.param_groups), self._group_lists))):
            return True
        return state and (len(self.state) != len(self._state_entries)
                          or not all(map(is_, self.state.values(), self._state_entries)))

    def _follow(self, state: bool = True) -> None:
        """Follow changes made by hand (torch's step uses whatever the groups and state hold).

        Parameters appended to, removed from or replaced in the groups: checked, then every
        parameter repacked, as :meth:`add_param_group` does. With ``state``, ``optimizer.state``
        cleared, replaced, entries deleted or given new tensors: every entry checked, then the
        buffers follow it (a parameter without an entry gets zero moments and step 0, torch's
        fresh state)."""
        if [list(map(id, group["params"])) for group in self.param_groups] != self._group_ids:
            for group in self.param_groups:
                self._check_group(group)
            self._check_params()
            self._rebuild()
            return
        if not state:
            return
        entries = [bucket.read_state(self.state) for bucket in self._buckets]
        with torch.no_grad():
            for bucket, checked in zip(self._buckets, entries):
                bucket.write_state(self.state, checked)
        self._watch()

    # -- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One RAdam step of every parameter with a gradient; returns ``closure()``'s loss, if given.

        Changes made by hand to the groups' parameters or to ``optimizer.state`` are followed
        first (checked, then repacked or copied in); then every check (hyperparameters,
        parameters still in place, gradients) runs before any buffer or step count is written.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._changed():
            self._follow()
        try:
            groups = [_options(group) for group in self.param_groups]
        except (TypeError, ValueError):
            for g, group in enumerate(self.param_groups):
                _options(group, f"groups[{g}].")  # raises again, naming the group
            raise
        checked = [_validatable(options) for options in groups]
        if self._group_checks is None or len(self._group_checks.checked) != len(checked):
            self._group_checks = CheckedGroups(checked)  # every group checked, with or without gradients
        else:
            self._group_checks.keep(checked, self._group_checks.check(checked))
        lrs = [options["lr"] for options in groups]
        checked = self._group_checks.checked  # validated: the plans take them as they are
        gradients = [bucket.check_gradients() for bucket in self._buckets]
        steps = [bucket.prepare(active, grads, checked, lrs) for bucket, (active, grads) in zip(self._buckets, gradients)]
        installed = False
        for bucket, (active, _), step in zip(self._buckets, gradients, steps):
            new = active & ~bucket.has_state
            if new.any():
                for i in np.flatnonzero(new):
                    self.state[bucket.params[i]] = bucket.state_entry(i)
                bucket.has_state |= new
                installed = True
            step()
        if installed:
            self._watch()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; ``set_to_none=False`` zeroes one flat gradient buffer per device/dtype
        (and makes the gradients views of it, so the next step copies nothing)."""
        if self._changed(state=False):
            self._follow(state=False)  # parameters added by hand are zeroed too; the state waits for the step
        with torch.no_grad():
            for bucket in self._buckets:
                bucket.zero_grad(set_to_none)

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.RAdam's ``state_dict`` (tensors are live views, as torch's are live tensors)."""
        state_dict = super().state_dict()
        state_dict["state"] = {key: dict(entry) if type(entry) is StateEntry else entry  # plain: weights_only loads
                               for key, entry in state_dict["state"].items()}
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
            if p is not None:
                check_state_entry(entry, p.shape, f"state of parameter {key}")
        super().load_state_dict({**state_dict, "param_groups": saved_groups})
        for group in self.param_groups:
            group["capturable"] = self._capturable
        self._follow()  # the buffers take the loaded state (copies, never aliases)

    # -- copies ------------------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's ``__setstate__``; an optimizer unpickled or deep-copied (its groups and state hold
        copies of the parameters and tensors) packs its parameters into buffers of its own."""
        super().__setstate__(state)
        if "_buckets" in self.__dict__:
            return  # load_state_dict: it refills the buffers itself
        self.param_groups = [_decode_extras(group) for group in self.param_groups]
        self._capturable = bool(self.param_groups[0]["capturable"])
        self._buckets = []
        self._group_checks = None
        self._building = False
        self._check_params()
        self._rebuild()

    def __copy__(self) -> "RAdam":
        """A shallow copy, as torch's: the same param groups and state (and here the same buffers)."""
        copied = type(self).__new__(type(self))
        torch.optim.Optimizer.__setstate__(copied, {key: value for key, value in self.__dict__.items()
                                                    if not key.startswith("_optimizer_")})
        return copied
