"""The PyTorch drop-in: ``fastradam.torch.RAdam`` for ``torch.optim.RAdam``, one fused step per device/dtype.

Change ``torch.optim.RAdam(...)`` to ``fastradam.torch.RAdam(...)``: same constructor, param
groups, ``state_dict`` format and training trajectory; the flat buffers live in
:mod:`fastradam.torch.buckets`. ``optimizer.clip_grad_norm_`` and :class:`GradScaler` (``torch.amp.GradScaler``
whose ``unscale_`` writes no gradient) fold clipping and AMP unscaling into the step
(:mod:`fastradam.torch.clipping`, :mod:`fastradam.torch.amp`).
"""

from __future__ import annotations

import collections
from operator import is_, itemgetter
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from fastradam.flavours import PRESETS, Flavour, FlavourLike
from fastradam.rounding import check_seed
from fastradam.schedules import KerasWarmup
from fastradam.torch.buckets import (KEEPER_DTYPE, MASTER_KEY, SIXTEEN_BIT, Changes, FlatBucket, ParamList,
                                     StateEntry, check_master_entry, check_parameter, check_state_entry,
                                     checked_gradient, is_dtensor, local_tensor, memory_overlap, storage_of)
from fastradam.options import DEFAULTS, CheckedGroups, GroupOptions, check_flag, check_group
from fastradam.torch import clipping
from fastradam.torch.clipping import NONFINITE, Pending, Unscaled

__all__ = ["RAdam", "GradScaler"]

#: Group keys torch.optim.RAdam keeps that fastradam does not use (``foreach`` is ignored).
TORCH_ONLY_DEFAULTS = {"foreach": None, "capturable": False, "differentiable": False}
#: fastradam's own group keys, left out of ``state_dict`` while they hold these defaults.
EXTRA_DEFAULTS = {name: DEFAULTS[name] for name in ("eps_root", "flavour", "schedule")}
_PARAMS = itemgetter("params")
#: The key of the stochastic-rounding seed in each of a ``state_dict``'s param groups.
SEED_KEY = "stochastic_round_seed"
#: How the optimizer keeps 16-bit parameters' values: its constructor's options (Transformer
#: Engine's ``master_weights`` / ``store_param_remainders``, torchao's ``bf16_stochastic_round``)
#: and the resolved seed. Plain values: pickled and deep-copied with the optimizer.
NO_KEEPING = {"master_weights": False, "store_param_remainders": False, "bf16_stochastic_round": False,
              SEED_KEY: None}


def _keeping(master_weights: Any, store_param_remainders: Any, bf16_stochastic_round: Any, seed: Any,
             capturable: bool) -> dict:
    """The checked options of :data:`NO_KEEPING`'s keys (nothing is built yet): the seed drawn as
    ``torch.initial_seed()`` where stochastic rounding takes none."""
    master_weights = check_flag("master_weights", master_weights)
    remainders = check_flag("store_param_remainders", store_param_remainders)
    stochastic = check_flag("bf16_stochastic_round", bf16_stochastic_round)
    if remainders and not master_weights:
        raise ValueError("store_param_remainders=True keeps the fp32 master weights as int16 remainders beside "
                         "the bfloat16 parameters: it needs master_weights=True")
    if stochastic and master_weights:
        raise ValueError("bf16_stochastic_round=True rounds bfloat16 parameters without a master: it replaces "
                         "master_weights=True, pass one of them")
    if stochastic and capturable:
        raise ValueError("bf16_stochastic_round=True needs host step counts (its random bits are keyed by the "
                         "step on the host): not with capturable=True")
    if seed is not None and not stochastic:
        raise ValueError("stochastic_round_seed is the seed of bf16_stochastic_round=True; pass it with that")
    if stochastic:
        seed = torch.initial_seed() if seed is None else check_seed(seed)
    return {"master_weights": master_weights, "store_param_remainders": remainders,
            "bf16_stochastic_round": stochastic, SEED_KEY: seed}


def _saved_seed(groups: list[dict]) -> int | None:
    """The stochastic-rounding seed of a ``state_dict``'s groups (checked: an int, the same in each), or None."""
    seeds = {repr(group[SEED_KEY]): group[SEED_KEY] for group in groups if SEED_KEY in group}
    if not seeds:
        return None
    if len(seeds) > 1:
        raise ValueError(f"loaded state dict has different {SEED_KEY} values in its groups: {sorted(seeds)}")
    return check_seed(next(iter(seeds.values())), f"the loaded state dict's {SEED_KEY}")


def _options(group: dict, where: str = "") -> dict:
    """A torch param group as fastradam group options (a host lr unless the group is capturable);
    ``where`` (``"groups[1]."``) prefixes the option's name in messages."""
    options = {key: group[key] for key in DEFAULTS}
    lr = options["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor {where}lr must be 1-element, got shape {tuple(lr.shape)}")  # (torch's words)
        if lr.is_complex():
            raise TypeError(f"{where}lr must be a real number, got a {lr.dtype} tensor")
        if not group["capturable"]:
            options["lr"] = float(lr)
    return options


def _validatable(options: dict, where: str = "") -> dict:
    """Options as ``check_group`` takes them: a capturable group's lr may be a 0-d floating tensor
    (read on the device at each step), checked here and validated through a placeholder."""
    lr = options["lr"]
    if not isinstance(lr, torch.Tensor):
        return options
    if lr.dim() != 0 or not lr.is_floating_point():
        raise ValueError(f"a tensor {where}lr must be a 0-d floating tensor, got shape {tuple(lr.shape)} "
                         f"and {lr.dtype}")
    return {**options, "lr": 0.0}


def _torch_refusal(group: dict) -> str | None:
    """torch.optim.RAdam's constructor's message for a value it refuses (its checks, its words), or
    None where it takes the group's values: a refusal of either optimizer then starts with torch's words."""
    try:
        lr, eps, (beta1, beta2), weight_decay = group["lr"], group["eps"], group["betas"], group["weight_decay"]
        for ok, words in ((0.0 <= lr, f"Invalid learning rate: {lr}"), (0.0 <= eps, f"Invalid epsilon value: {eps}"),
                          (0.0 <= beta1 < 1.0, f"Invalid beta parameter at index 0: {beta1}"),
                          (0.0 <= beta2 < 1.0, f"Invalid beta parameter at index 1: {beta2}"),
                          (0.0 <= weight_decay, f"Invalid weight_decay value: {weight_decay}")):
            if not ok:
                return words
    except (TypeError, ValueError, RuntimeError):
        return None  # not torch's kind of value at all: fastradam's message says what is wrong
    return None


class _Packing:
    """An optimizer's flat buckets, its count of changes made by hand, and what its last look at the
    groups and the state saw (:meth:`RAdam._watch`). Shallow copies of the optimizer share it, as
    they share the groups and the state, so a repack through one is seen by the others."""

    __slots__ = ("buckets", "changes", "seen", "group_lists", "group_params", "state_entries")

    def __init__(self) -> None:
        self.buckets: list[FlatBucket] = []
        self.changes = Changes()
        self.seen = 0
        self.group_lists: list[list] = []  # the groups' ``params`` objects
        self.group_params: list[list] = []  # their parameters then (held: compared by identity)
        self.state_entries: list = []


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


def _as_torch_moments(state: dict, params: list[torch.Tensor]) -> None:
    """In a ``state_dict``'s ``state`` (keyed by position in ``params``, as torch numbers them), moments of
    another dtype than their parameter's (float16 parameters' float32 moments) as copies in the
    parameter's dtype, as torch.optim.RAdam holds them."""
    for key, entry in state.items():
        p = params[key] if isinstance(key, int) and key < len(params) else None
        if p is None or not isinstance(entry, dict):
            continue
        cast = {name: value.to(p.dtype) for name in ("exp_avg", "exp_avg_sq")
                if isinstance(value := entry.get(name), torch.Tensor) and value.is_floating_point()
                and value.dtype != p.dtype}
        if cast:
            state[key] = {**entry, **cast}  # a new dict: the optimizer's own entry keeps its views


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

    Changed by hand (state entries and group parameter lists count their changes, each optimizer
    in its own count, and each step compares the identities of the state's entries and the groups'
    lists: C loops, no tensor work)
        * ``optimizer.state`` cleared, replaced (``= defaultdict(dict)``) or an entry deleted: those
          parameters start again from zero moments and step 0 at their next gradient, as torch's.
        * A state entry or tensor replaced (``state[p] = {...}``, ``state[p]["exp_avg"] = t``;
          ZeroRedundancyOptimizer's ``load_state_dict`` assigns entries so): the next step checks
          them (shapes), copies their values into the flat buffers and points the entry back at its
          views, so the step uses ``t``'s values, as torch's does, though ``t`` itself is not
          updated afterwards (torch's would be, in place). Copying in rather than refusing keeps
          torch's own code that assigns state working. The entries are :class:`StateEntry` and the
          groups' ``params`` :class:`ParamList` (a dict and a list that count their changes);
          :meth:`state_dict` gives plain dicts, and so do copies and pickles of them. Values of
          entries swapped between parameters (of one buffer or of two) are all read before any is
          written.
        * Parameters appended to (removed from, replaced in) ``param_groups[i]["params"]``: checked,
          then every parameter is repacked at the next :meth:`step` or :meth:`zero_grad`, as
          :meth:`add_param_group` does, and trained as torch trains them. A parameter removed gets
          its own copies of its values, of a gradient that viewed the flat gradient buffer and of
          its state tensors (torch keeps its state entry), so it keeps no buffer alive. A parameter
          listed twice is refused (``some parameters appear in more than one parameter group``;
          twice in one group, which torch warns about and steps twice: ``... duplicate parameters``).
        * ``copy.deepcopy(optimizer)``, pickling, ``torch.save(optimizer)`` + ``torch.load``: the
          copy repacks its copies of the parameters into buffers of its own, so
          ``copy.deepcopy((model, optimizer))`` gives an optimizer of the copied model, and an
          optimizer copied alone trains its own copies, as torch's. The state tensors are pickled
          as compact copies (not as views of the whole flat buffers); the parameters as they are
          (plain pickle writes the whole flat parameter buffer for each one, as for any views of one
          tensor; ``torch.save`` writes it once). ``copy.copy`` shares the groups, state, buffers and
          count of changes, as torch's shares the groups and state: a repack through either copy is
          seen by both.

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

    Dtypes
        float32, float64, bfloat16, float16, complex64 and complex128 parameters, each (device,
        dtype) in its own buffers. The math is float32 (float64 for float64/complex128) with one
        rounding per stored value and step; torch computes 16-bit steps op by op in the parameter
        dtype. Moments: torch keeps them in the parameter's dtype (``zeros_like(p)``); here
        bfloat16 parameters keep bfloat16 moments (torch's choice), float16 parameters get float32
        moments (fastradam stores moments as float32 or bfloat16 only, and float32 is strictly more
        accurate: a first step's ``(1 - beta2) * grad**2`` underflows float16 for gradients below
        ~5e-3). ``optimizer.state`` holds those float32 views; :meth:`state_dict` saves them as
        float16 copies (torch's state dtype, so a checkpoint of either optimizer loads into the
        other; a save and load rounds the moments to float16, as torch's always are) and
        :meth:`load_state_dict` casts float16 ones back up. Complex parameters are stepped as their
        real views (``torch.view_as_real``), as torch steps them: the buffers hold float32/float64
        pairs; ``p.data``, gradient views and the state's ``exp_avg``/``exp_avg_sq`` are complex
        views of them (complex, as torch's state).

    Master weights (Transformer Engine's and torchao's option names; one setting for the whole optimizer)
        * ``master_weights=True``: bfloat16/float16 buckets keep a flat float32 master (the plans'
          ``master_params``), state key ``"master_param"`` (TE's). float32/float64 parameters are
          their own master: nothing is kept for them.
        * ``store_param_remainders=True`` (with ``master_weights=True``, bfloat16 parameters only:
          float16 ones are refused, float32 ones keep nothing): int16 remainders under
          ``"master_param"`` (TE's key and format), with the parameters the float32 master bit for bit.
        * ``bf16_stochastic_round=True`` (not with ``master_weights`` or ``capturable``): bfloat16
          buckets round each step's float32 result stochastically, bits hashed from
          (``stochastic_round_seed``, step, the element's place in its bucket); the seed defaults
          to ``torch.initial_seed()`` and is saved in every group of :meth:`state_dict`
          (``"stochastic_round_seed"``) and taken back by :meth:`load_state_dict`.
        A master is taken from its parameter's values at the parameter's first step with fresh
        state (weights loaded into the model after the optimizer was built are the ones trained),
        a remainder starts at zero. :meth:`state_dict` holds the master/remainder in each entry
        (float16 parameters' float32 moments as they are, for an exact resume); a checkpoint
        without it (``torch.optim.RAdam``'s) starts the masters from the parameters; one of the
        other format or dtype is refused before anything is loaded.

    Clipping and AMP (``tests/test_torch_clip.py``)
        * ``optimizer.clip_grad_norm_(max_norm, norm_type=2.0, error_if_nonfinite=False,
          foreach=None, *, process_group=None)`` is ``torch.nn.utils.clip_grad_norm_`` over this
          optimizer's gradients, fused: it returns the total norm as torch does (a 0-d tensor of the
          gradients' promoted dtype on the first gradient's device), computed now by one read-only
          pre-pass per buffer (the gradients exactly as the next step takes them: views of the flat
          gradient buffer, fresh gradients, which a gathering buffer copies into its flat gradient
          buffer now instead of at the step, or engine-owned views read where they are), in float64.
          **The clip applies at the next step**, which multiplies each gradient by
          ``min(1, max_norm / (norm + 1e-6))`` inside its own pass, with the norm computed at the call:
          the gradients are never written, so ``p.grad`` keeps its unclipped values (torch's are
          clipped in place; read the returned norm instead). torch keeps no such state: here
          ``zero_grad()`` drops a pending clip, a second call replaces it, and a step whose gradients
          changed since the call (another backward, a gradient written or replaced; seen by each
          gradient's identity and version counter) raises a RuntimeError, writing nothing, rather
          than clip them by a stale norm. ``max_norm`` must be > 0; ``norm_type`` any p > 0 or inf
          (complex gradients: the norm of their magnitudes, torch's; stepped as real views).
        * Across ranks the norm is global, summed as ``norm**p`` (max for inf) through
          ``torch.distributed``: FSDP2's DTensor parameters over the mesh dimensions they are
          sharded on, automatically (as FSDP2's clipping does); plain parameters over
          ``process_group`` when given, for ZeroRedundancyOptimizer
          (``zero.optim.clip_grad_norm_(max_norm, process_group=zero.process_group)``, then
          ``zero.step()``). Every rank must call it (it is a collective then).
        * ``_step_supports_amp_scaling``: ``torch.amp.GradScaler.step`` hands this optimizer the scale
          (``grad_scale``) and ``found_inf``; the step divides the scale out inside its pass and a
          found_inf skips it entirely (nothing written, no step count advanced, no state made, as
          ``torch.optim.RAdam`` under the scaler), so ``scaler.step`` without ``unscale_`` costs
          torch's found_inf check and one step pass. ``scaler.unscale_`` (torch's) writes the
          gradients and then works as usual with either clip.
        * ``fastradam.torch.GradScaler`` (a ``torch.amp.GradScaler``) does not write them: its
          ``unscale_`` runs one 2-norm pre-pass of ``grad / scale`` (its finiteness is found_inf, so
          ``update()`` backs off as torch's) and records the scale; a following
          ``clip_grad_norm_(max_norm)`` (2-norm) reuses that norm, and ``scaler.step`` steps with the
          scale and the clip folded in: ``unscale_`` + clip + step read the gradients twice and
          write them never (torch's
          recipe: four reads and two writes). It also unscales float16 gradients,
          which torch's ``unscale_`` refuses.
        * On CUDA the scale and found_inf are read on the host at the step (``float()``: a
          synchronisation), and so is the norm for ``error_if_nonfinite=True``; the norms
          themselves stay on the device.

    Not supported: sparse gradients (RuntimeError at the step), complex32 and other dtypes,
    complex DTensors (TypeError), ``differentiable=True`` (NotImplementedError), ``capturable``
    on the CPU (ValueError), a parameter listed twice or two over overlapping memory (ValueError).
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
        master_weights: bool = False,
        store_param_remainders: bool = False,
        bf16_stochastic_round: bool = False,
        stochastic_round_seed: int | None = None,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "maximize": maximize,
                    "foreach": foreach, "capturable": capturable,
                    "decoupled_weight_decay": decoupled_weight_decay, "differentiable": differentiable,
                    "eps_root": eps_root, "flavour": flavour, "schedule": schedule}
        self._check_group(defaults)
        self._keeping = _keeping(master_weights, store_param_remainders, bf16_stochastic_round,
                                 stochastic_round_seed, bool(capturable))
        self._capturable = bool(capturable)
        self._packing = _Packing()
        self._group_checks: CheckedGroups | None = None
        #: The clip and the AMP unscale the next step applies (:meth:`clip_grad_norm_`, GradScaler.unscale_)
        self._clip_pending: Pending | None = None
        self._unscaled: Unscaled | None = None
        self._building = True
        super().__init__(params, defaults)
        self._building = False
        self._check_params()  # once, over every group
        keeping = self._keeping
        if keeping["store_param_remainders"] or keeping["bf16_stochastic_round"]:
            if not any(p.dtype == torch.bfloat16 for group in self.param_groups for p in group["params"]):
                option = "store_param_remainders" if keeping["store_param_remainders"] else "bf16_stochastic_round"
                raise TypeError(f"{option}=True is for bfloat16 parameters, and there is none here")
        self._rebuild()

    # -- groups and buffers ------------------------------------------------------------------

    @staticmethod
    def _check_group(group: dict) -> None:
        if group["differentiable"]:
            raise NotImplementedError("fastradam.torch.RAdam does not support differentiable=True "
                                      "(use torch.optim.RAdam for a differentiable step)")
        if group["capturable"] and group["schedule"] is not None:
            raise ValueError("schedule needs a host step; with capturable=True pass the scheduled lr instead")
        try:
            check_group(_validatable(_options(group)))
        except ValueError as error:
            words = _torch_refusal(group)
            if words is None:
                raise
            raise ValueError(f"{words} ({error})") from None

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

    @property
    def _buckets(self) -> list[FlatBucket]:
        """The flat buckets, one per (device, dtype)."""
        return self._packing.buckets

    def _check_params(self, gradients: bool = False) -> None:
        """Every parameter of every group, checked before any is packed: a supported leaf tensor,
        listed once, sharing no memory with another (packing would stop them sharing it); with
        ``gradients``, its gradient too (as a step checks it)."""
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
                if p.dtype == torch.float16 and self._keeping["store_param_remainders"]:
                    raise TypeError(f"{where} is torch.float16: store_param_remainders=True keeps int16 remainders "
                                    "beside bfloat16 parameters only (they are the low halves of an fp32 master "
                                    "whose high halves are bfloat16); train float16 parameters in an optimizer "
                                    "with master_weights=True alone")
                if self._capturable and p.device.type != "cuda":
                    raise ValueError(f"capturable=True needs CUDA parameters; {where} is on {p.device} (move the "
                                     "parameters to CUDA first, or leave capturable=False off CUDA)")
                if gradients and p.grad is not None:
                    checked_gradient(p.grad, where, p.dtype, p.device, local_tensor(p).shape if is_dtensor(p) else None)
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
        """(Re)pack every parameter into one bucket per (device, dtype), carrying values and state over;
        parameters of the old buckets no longer in any group get their own copies (:meth:`FlatBucket.release`)."""
        packing = self._packing
        grad_views = any(bucket.grads_adopted for bucket in packing.buckets)
        members: dict[tuple, tuple[list, list]] = {}
        names = {}
        for g, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                params, groups = members.setdefault((p.device, p.dtype, is_dtensor(p)), ([], []))
                params.append(p)
                groups.append(g)
                names[p] = self._name(g, j)
        describe = names.__getitem__
        buckets = [FlatBucket(params, groups, capturable=self._capturable, describe=describe, changes=packing.changes,
                              sharded=key[2], keeping=self._keeping_of(key[1]), round_seed=self._keeping[SEED_KEY])
                   for key, (params, groups) in members.items()]
        incoming = self._read_state(buckets)  # all checked before any parameter moves
        with torch.no_grad():
            for bucket, entries in zip(buckets, incoming):
                bucket.adopt(self.state, entries, grad_views)
            kept = set(map(id, names))
            for bucket in packing.buckets:
                bucket.release([p for p in bucket.params if id(p) not in kept], self.state)
        packing.buckets = buckets
        self._watch()

    def _keeping_of(self, dtype: torch.dtype) -> str | None:
        """How a bucket of ``dtype`` parameters keeps their values (:data:`fastradam.torch.buckets.KEEPINGS`)."""
        keeping = self._keeping
        if keeping["master_weights"] and dtype in SIXTEEN_BIT:
            return "remainders" if keeping["store_param_remainders"] and dtype == torch.bfloat16 else "master"
        if keeping["bf16_stochastic_round"] and dtype == torch.bfloat16:
            return "stochastic"
        return None

    def _read_state(self, buckets: list[FlatBucket]) -> list[list]:
        """Every bucket's state as :meth:`FlatBucket.read_state` reads it, values over any of these
        buckets' storages copied: read for all before any of them is written."""
        written = set().union(*(bucket.storages() for bucket in buckets))
        return [bucket.read_state(self.state, written) for bucket in buckets]

    # -- following changes made by hand --------------------------------------------------------

    def _watch(self) -> None:
        """Remember the groups' parameter lists and the state entries as they are now: each step
        compares their identities (and :class:`Changes`) and follows what changed (:meth:`_follow`)."""
        packing = self._packing
        changes = packing.changes
        for group in self.param_groups:
            params = group["params"]
            if type(params) is not ParamList or params._changes is not changes:
                group["params"] = ParamList(changes, params)
        packing.group_lists = list(map(_PARAMS, self.param_groups))
        packing.group_params = [list(params) for params in packing.group_lists]
        packing.state_entries = list(self.state.values())
        packing.seen = changes.count

    def _changed(self, state: bool = True) -> bool:
        """Whether anything :meth:`_watch` remembered (the groups, and with ``state`` the state) may
        have changed: identities and lengths only, compared in C loops."""
        packing = self._packing
        if (packing.changes.count != packing.seen or len(self.param_groups) != len(packing.group_lists)
                or not all(map(is_, map(_PARAMS, self.param_groups), packing.group_lists))):
            return True
        return state and (len(self.state) != len(packing.state_entries)
                          or not all(map(is_, self.state.values(), packing.state_entries)))

    def _same_params(self) -> bool:
        """Whether every group holds the very parameters it held at :meth:`_watch`, in that order."""
        known = self._packing.group_params
        return len(known) == len(self.param_groups) and all(
            len(params) == len(group["params"]) and all(map(is_, params, group["params"]))
            for params, group in zip(known, self.param_groups))

    def _follow(self, state: bool = True, gradients: bool = False) -> None:
        """Follow changes made by hand (torch's step uses whatever the groups and state hold); every
        check of them passes before anything is written.

        Parameters appended to, removed from or replaced in the groups: the groups and parameters
        (with ``gradients``, their gradients too) checked, then every parameter repacked, as
        :meth:`add_param_group` does. Otherwise, with ``state``: ``optimizer.state`` cleared,
        replaced, entries deleted or given new tensors: every entry (with ``gradients``, every
        bucket's gradients) checked, then the buffers follow it (a parameter without an entry gets
        zero moments and step 0, torch's fresh state)."""
        if not self._same_params():
            for group in self.param_groups:
                self._check_group(group)
            self._check_params(gradients)
            self._rebuild()
            return
        if not state:
            return
        buckets = self._packing.buckets
        if gradients:
            for bucket in buckets:
                bucket.check_gradients()
        incoming = self._read_state(buckets)
        with torch.no_grad():
            for bucket, entries in zip(buckets, incoming):
                bucket.write_state(self.state, entries)
        self._watch()

    # -- the step ----------------------------------------------------------------------------

    #: torch's contract for fused optimizers: ``torch.amp.GradScaler.step`` sets ``optimizer.grad_scale``
    #: and ``optimizer.found_inf`` and calls :meth:`step`, which divides the scale out inside its pass
    #: and skips the step where ``found_inf`` is set (torch's fused Adam does the same).
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One RAdam step of every parameter with a gradient; returns ``closure()``'s loss, if given.

        First every group's options are checked. Then changes made by hand to the groups'
        parameters or to ``optimizer.state`` are followed: the groups, parameters, state entries
        and gradients are checked, then the parameters repacked or the state copied in. Then the
        step's own checks (parameters still in place, gradients, the plans' checks of their
        buffers) run before any parameter, moment or step count is written. So a bad option, a
        refused state entry or a refused gradient leaves the buffers and the state as they were;
        a hand change followed stays followed (the buffers then hold what the groups and state say).

        A clip asked for by :meth:`clip_grad_norm_` (and a scale recorded by
        :class:`fastradam.torch.GradScaler`'s ``unscale_``) is applied inside this step, then
        cleared. Under ``torch.amp.GradScaler.step`` (``grad_scale``/``found_inf`` set on the
        optimizer) the gradients are divided by the scale inside the step, and a set ``found_inf``
        skips it: nothing is checked or written, no step count advances, the pending clip is dropped.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pending, unscaled = self._clip_pending, self._unscaled
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0.0:  # (a sync on CUDA)
            self._clip_pending = self._unscaled = None
            return loss
        grad_scale = 1.0 if unscaled is None else unscaled.grad_scale
        amp_scale = getattr(self, "grad_scale", None)
        if amp_scale is not None:
            grad_scale *= float(amp_scale)  # (a sync on CUDA)
        checked, lrs = self._check_options()
        if self._changed():
            self._follow(gradients=True)
        buckets = self._packing.buckets
        gradients = [bucket.check_gradients() for bucket in buckets]
        if pending is None and unscaled is None:  # the common step: no clip, no recorded scale
            steps = [bucket.prepare(active, grads, checked, lrs, grad_scale)
                     for bucket, (active, grads) in zip(buckets, gradients)]
        else:
            steps = self._prepare_recorded(pending, unscaled, buckets, gradients, checked, lrs, grad_scale)
        installed = False
        self._clip_pending = self._unscaled = None  # every check passed: applied now
        for bucket, (active, _), step in zip(buckets, gradients, steps):
            bucket.take_masters(active, self.state)
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

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None, *, process_group: Any = None) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` of this optimizer's gradients, applied inside the next :meth:`step`.

        Returns the total norm of the gradients (of every parameter with one; ``norm_type`` a p > 0
        or inf, ``"inf"`` too), computed now by one read-only pre-pass per buffer, as torch returns
        it: a 0-d tensor of the gradients' (promoted) dtype on the first gradient's device
        (``torch.tensor(0.)`` without gradients; for FSDP2's DTensor gradients a plain tensor, the
        full norm). The gradients are **not** written: the next :meth:`step` multiplies each by
        ``min(1, max_norm / (total + 1e-6))`` inside its own pass, with the total computed here
        (kept in float64). So the clip applies at the next step, not at this call, to the gradients
        seen here; ``zero_grad()`` drops it, a new call replaces it, and a step whose gradients
        changed since (another backward, a gradient written or replaced) raises rather than clip
        them by a stale norm. After :class:`fastradam.torch.GradScaler`'s ``unscale_`` the norm is
        of the unscaled gradients and a 2-norm reuses its pre-pass.

        ``error_if_nonfinite=True``: a NaN/inf total raises torch's RuntimeError (nothing kept).
        ``foreach`` is accepted and ignored. ``process_group``: the ranks whose optimizers hold
        disjoint parts of the model (``ZeroRedundancyOptimizer``'s ``process_group``, e.g.
        ``torch.distributed.group.WORLD``): the norm**p is summed (max for inf) over them. DTensor
        parameters (FSDP2) are reduced over their mesh's sharded dimensions without it, as
        FSDP2's clipping does. ``max_norm`` must be > 0 (torch also takes 0 and negative values).
        """
        max_norm, norm_type = clipping.check_clip_arguments(max_norm, norm_type)
        unscaled = self._unscaled
        norms = None if unscaled is None else clipping.reuse(self, unscaled.norms, norm_type, process_group)
        if norms is None:
            norms = clipping.compute(self, norm_type, 1.0 if unscaled is None else unscaled.grad_scale, process_group)
        if error_if_nonfinite and not clipping.is_finite(norms.total):
            raise RuntimeError(NONFINITE.format(norm_type=norm_type))
        self._clip_pending = Pending(max_norm, norms)
        return clipping.as_tensor(norms)

    def _unscale(self, grad_scale: float, device: torch.device) -> torch.Tensor:
        """:class:`fastradam.torch.GradScaler`'s ``unscale_``: the 2-norm pre-pass of the gradients
        divided by ``grad_scale``, recorded for the next :meth:`clip_grad_norm_` and :meth:`step`
        (nothing written); returns found_inf (1.0 where the norm is NaN/inf) on ``device``."""
        norms = clipping.compute(self, 2.0, grad_scale, None)
        self._unscaled = Unscaled(grad_scale, norms)
        return clipping.found_inf_of(norms.total, device)

    def _prepare_recorded(self, pending: Any, unscaled: Any, buckets: list, gradients: list,
                          checked: list[GroupOptions], lrs: list[Any], grad_scale: float) -> list:
        """The buckets' prepared steps with a pending clip or a recorded scale, once the gradients
        are checked to be the ones those were computed on."""
        for record, what, hint in (
                (unscaled, "fastradam.torch.GradScaler.unscale_(optimizer)",
                 "; it leaves the gradients scaled (the step divides the scale out): clip them with "
                 "optimizer.clip_grad_norm_(), not torch.nn.utils.clip_grad_norm_"),
                (pending, "optimizer.clip_grad_norm_()", "")):
            if record is not None and not clipping.same_gradients(self, record.norms, gradients):
                raise RuntimeError(
                    f"the gradients changed after {what} (another backward, a gradient written or replaced, "
                    "parameters repacked): the clip and the unscaling are applied inside the next step, to the "
                    f"gradients they were computed on; call zero_grad() to drop them{hint}")
        clips = [None] * len(buckets) if pending is None else [
            {"max_grad_norm": pending.max_norm, "norm_type": pending.norms.norm_type,
             "grad_norm": clipping.norm_for(pending.norms.total, bucket)} for bucket in buckets]
        gathered = [any(record.norms.gathered[b] for record in (unscaled, pending) if record is not None)
                    for b in range(len(buckets))]  # (the records were checked: these very gradients)
        return [bucket.prepare(active, grads, checked, lrs, grad_scale, clip, copied)
                for bucket, (active, grads), clip, copied in zip(buckets, gradients, clips, gathered)]

    def _check_options(self) -> tuple[list[GroupOptions], list[Any]]:
        """Every group's options checked (every group, with or without gradients; nothing written):
        the validated options, which the plans take as they are, and the lrs as given (tensors
        where capturable)."""
        try:
            groups = [_options(group) for group in self.param_groups]
            checked = [_validatable(options) for options in groups]
        except (TypeError, ValueError):
            for g, group in enumerate(self.param_groups):
                where = f"groups[{g}]."
                _validatable(_options(group, where), where)  # raises again, naming the group
            raise
        if self._group_checks is None or len(self._group_checks.checked) != len(checked):
            self._group_checks = CheckedGroups(checked)
        else:
            self._group_checks.keep(checked, self._group_checks.check(checked))
        return self._group_checks.checked, [options["lr"] for options in groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; ``set_to_none=False`` zeroes one flat gradient buffer per device/dtype
        (and makes the gradients views of it, so the next step copies nothing). A pending
        :meth:`clip_grad_norm_` (and GradScaler unscale) is dropped with the gradients."""
        self._clip_pending = self._unscaled = None  # they were of the gradients dropped here
        if self._changed(state=False):
            self._follow(state=False)  # parameters added by hand are zeroed too; the state waits for the step
        with torch.no_grad():
            for bucket in self._packing.buckets:
                bucket.zero_grad(set_to_none)

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.RAdam's ``state_dict`` (tensors are live views, as torch's are live tensors; the
        float32 moments of float16 parameters are saved as float16 copies, torch's state dtype)."""
        state_dict = super().state_dict()
        state_dict["state"] = {key: dict(entry) if type(entry) is StateEntry else entry  # plain: weights_only loads
                               for key, entry in state_dict["state"].items()}
        if not self._keeping["master_weights"] and any(bucket.moment_dtype != bucket.storage_dtype
                                                       for bucket in self._packing.buckets):
            _as_torch_moments(state_dict["state"], [p for group in self.param_groups for p in group["params"]])
        for group in state_dict["param_groups"]:
            _encode_extras(group)
            if self._keeping["bf16_stochastic_round"]:
                group[SEED_KEY] = self._keeping[SEED_KEY]
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
        seed = _saved_seed(saved_groups)
        for group in saved_groups:
            group.pop(SEED_KEY, None)  # the optimizer's, not a group option
        uncast = {}  # what torch's load would cast to the parameter's dtype: masters, float32 moments of float16
        for key, entry in state_dict["state"].items():
            p = ids_to_params.get(key)
            if p is not None:
                where = f"state of parameter {key}"
                check_state_entry(entry, p.shape, where)
                if MASTER_KEY in entry:
                    check_master_entry(entry[MASTER_KEY], p.shape, KEEPER_DTYPE.get(self._keeping_of(p.dtype)), where)
                uncast[p] = {name: value for name in ("exp_avg", "exp_avg_sq", MASTER_KEY)
                             if isinstance(value := entry.get(name), torch.Tensor) and value.dtype != p.dtype}
        super().load_state_dict({**state_dict, "param_groups": saved_groups})
        for group in self.param_groups:
            group["capturable"] = self._capturable
        for p, values in uncast.items():
            if values and isinstance(self.state.get(p), dict):
                self.state[p].update(values)  # copied into the buffers next (never aliased)
        if seed is not None and self._keeping["bf16_stochastic_round"]:
            self._keeping = {**self._keeping, SEED_KEY: seed}
            for bucket in self._packing.buckets:
                bucket.set_round_seed(seed)
        self._follow()  # the buffers take the loaded state (copies, never aliases)

    # -- copies ------------------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        """torch's ``__setstate__``; an optimizer unpickled or deep-copied (its groups and state hold
        copies of the parameters and tensors) packs its parameters into buffers of its own."""
        super().__setstate__(state)
        if "_packing" in self.__dict__:
            return  # load_state_dict: it refills the buffers itself
        self.param_groups = [_decode_extras(group) for group in self.param_groups]
        self._capturable = bool(self.param_groups[0]["capturable"])
        self._keeping = {**NO_KEEPING, **state.get("_keeping", {})}
        self._packing = _Packing()
        self._group_checks = None
        self._clip_pending = self._unscaled = None
        self._building = False
        self._check_params()
        self._rebuild()

    def __getstate__(self) -> dict[str, Any]:
        """torch's ``__getstate__`` (what pickling and ``copy.deepcopy`` copy), the state's tensors that
        view the flat buffers as compact copies: pickle writes a view's whole storage, once per
        view. (The parameters are pickled as they are: each one's ``.data`` views the flat
        parameter buffer, which plain pickle writes whole for each; ``torch.save`` writes it once.)"""
        buffers = set().union(*(bucket.storages() for bucket in self._packing.buckets))
        copies: dict[int, torch.Tensor] = {}

        def compact(value: Any) -> Any:
            if storage_of(value) not in buffers:
                return value
            if id(value) not in copies:  # a tensor in two entries stays one tensor
                copies[id(value)] = value.clone()
            return copies[id(value)]

        state = collections.defaultdict(dict, {
            p: {name: compact(value) for name, value in entry.items()} if isinstance(entry, Mapping) else entry
            for p, entry in self.state.items()})
        return {**super().__getstate__(), "state": state, "_keeping": dict(self._keeping)}

    def __copy__(self) -> "RAdam":
        """A shallow copy, as torch's: the same param groups and state, and here the same buffers and
        record of changes made by hand (one :class:`_Packing`), so a repack through either is seen by both."""
        copied = type(self).__new__(type(self))
        torch.optim.Optimizer.__setstate__(copied, {key: value for key, value in self.__dict__.items()
                                                    if not key.startswith("_optimizer_")})
        return copied


from fastradam.torch.amp import GradScaler  # noqa: E402  (it needs RAdam)
