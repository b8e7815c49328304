"""Flat torch buffers of one device and dtype: parameters become views, moments and steps live beside them.

:class:`FlatBucket` is the storage half of :class:`fastradam.torch.RAdam`: it packs the
parameters of one (device, dtype) into a :class:`~fastradam.layout.FlatLayout`, points each
``p.data`` at its segment, keeps the moment buffers, the per-parameter step counts and
(optionally) a flat gradient buffer, and runs one fused step over them. It knows nothing of
param groups beyond each segment's group index, nor of ``state_dict``. The containers that count
the changes made to the optimizer by hand (:class:`StateEntry`, :class:`ParamList`, each counting
in its optimizer's :class:`Changes`) live here too.
"""

from __future__ import annotations

import contextlib
import numbers
import weakref
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from fastradam import backends
from fastradam.layout import FlatLayout
from fastradam.options import GroupOptions
from fastradam.plan import StepPlan

#: Parameter dtypes the drop-in steps (complex ones as their real views, as torch does).
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64, torch.complex128)
#: The dtype a bucket's flat buffers store its parameters (and gradients) in: complex parameters as
#: their real views (``torch.view_as_real``: each element as two reals), the others as they are.
STORAGE_DTYPE = {torch.complex64: torch.float32, torch.complex128: torch.float64}
#: The dtype of the flat moment buffers where it is not the storage dtype. torch keeps the moments in
#: the parameter's dtype (``zeros_like(p)``); fastradam's storage rule (:mod:`fastradam.storage`) has
#: no float16 moments (float32 or bfloat16 only), so float16 parameters get float32 moments, strictly
#: more accurate than torch's float16 ones. bfloat16 parameters keep bfloat16 moments (torch's choice).
MOMENT_DTYPE = {torch.float16: torch.float32}
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
#: The state key of a parameter's master (Transformer Engine's FusedAdam's name): its fp32 master
#: weights, or with remainders the int16 low halves of that master (TE keeps those there too).
MASTER_KEY = "master_param"
#: How a bucket's 16-bit parameters keep their fp32 values (:class:`FlatBucket`'s ``keeping``):
#: an fp32 master beside them, int16 remainders (with the bfloat16 params, the fp32 master bit for
#: bit), or stochastic rounding of each step's fp32 result; None: rounded to nearest-even.
KEEPINGS = (None, "master", "remainders", "stochastic")
#: The dtype of the state a keeping holds under :data:`MASTER_KEY`.
KEEPER_DTYPE = {"master": torch.float32, "remainders": torch.int16}
#: Devices the backends run on.
SUPPORTED_DEVICES = ("cpu", "cuda")
#: Below this many elements a CPU bucket copies fresh gradients into its flat gradient buffer (one
#: ``_foreach_copy_``, cache-resident) and takes the layout step: cheaper than validating and
#: stepping a tensor list per call. Above it the copy's memory traffic costs more than that.
GATHER_BELOW = 1 << 20


def is_dtensor(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ``torch.distributed.tensor.DTensor`` (FSDP2's sharded parameters are)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise): shares its storage."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def check_parameter(p: torch.Tensor, where: str) -> None:
    """TypeError unless ``p`` is a dense float32/float64/bfloat16/float16/complex64/complex128 tensor
    on a CPU or CUDA device (a complex DTensor is refused)."""
    if p.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where} has dtype {p.dtype}; supported dtypes are torch.float32, torch.float64, "
                        "torch.bfloat16, torch.float16, torch.complex64 and torch.complex128")
    if p.is_complex() and is_dtensor(p):
        raise TypeError(f"{where} is a complex DTensor; fastradam.torch.RAdam steps complex parameters only "
                        "as plain tensors (optimize torch.view_as_real of it instead)")
    if p.layout is not torch.strided:
        raise TypeError(f"{where} has layout {p.layout}; only dense (strided) parameters are supported")
    if p.device.type not in SUPPORTED_DEVICES:
        raise TypeError(f"{where} is on device {p.device}; supported devices are CPU and CUDA")


class Changes:
    """How many changes were made by hand to one optimizer's counting containers (its
    :class:`StateEntry` and :class:`ParamList` objects hold it): a step that finds the count moved
    looks at what changed; an unchanged step compares one number. Each optimizer has its own
    (shallow copies share it, as they share the groups and the state)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def counts_changes(*names: str) -> Callable[[type], type]:
    """A class decorator: each of the base class's mutating methods ``names`` also adds one to the
    instance's :class:`Changes` (``self._changes``; constructing, reading and copying are not counted)."""
    def counted(method: Callable) -> Callable:
        def mutate(self: Any, *args: Any, **kwargs: Any) -> Any:
            self._changes.count += 1
            return method(self, *args, **kwargs)
        mutate.__name__, mutate.__qualname__, mutate.__doc__ = method.__name__, method.__qualname__, method.__doc__
        return mutate

    def decorate(cls: type) -> type:
        for name in names:
            setattr(cls, name, counted(getattr(cls.__mro__[1], name)))
        return cls
    return decorate


@counts_changes("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem", "setdefault", "update")
class StateEntry(dict):
    """One parameter's entry in ``optimizer.state`` (``step``, ``exp_avg``, ``exp_avg_sq``): a dict
    that counts its changes in its optimizer's :class:`Changes`, so a step notices a tensor
    replaced by hand without looking at it. Copied or pickled, it is a plain dict."""

    __slots__ = ("_changes",)

    def __init__(self, changes: Changes, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._changes = changes

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return dict, (dict(self),)


@counts_changes("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend", "insert", "remove", "pop",
                "clear", "sort", "reverse")
class ParamList(list):
    """A param group's ``params``: a list that counts its changes in its optimizer's
    :class:`Changes`, so a step notices a parameter appended (removed, replaced) by hand without
    looking at every parameter. Copied or pickled, it is a plain list."""

    __slots__ = ("_changes",)

    def __init__(self, changes: Changes, params: Any = ()) -> None:
        super().__init__(params)
        self._changes = changes

    def __reduce_ex__(self, protocol: Any) -> tuple:
        return list, (list(self),)


def scalar_dtype() -> torch.dtype:
    """The dtype of the ``step`` counts, torch.optim.RAdam's rule (``_get_scalar_dtype``): float64 under
    ``torch.set_default_dtype(torch.float64)``, float32 otherwise."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def check_state_entry(entry: Any, shape: Sequence[int], where: str) -> None:
    """ValueError unless ``entry`` is torch.optim.RAdam's state of a parameter of ``shape``: a dict whose
    ``exp_avg`` and ``exp_avg_sq`` are tensors of that shape and whose ``step`` is a number or a
    one-element tensor. ``where`` names the entry in the message."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a dict of step, exp_avg and exp_avg_sq, got {type(entry).__name__}")
    for name in ("exp_avg", "exp_avg_sq"):
        value = entry.get(name)
        if not isinstance(value, torch.Tensor) or value.shape != tuple(shape):
            raise ValueError(f"{where}: {name} must be a tensor of shape {tuple(shape)}, "
                             f"got {getattr(value, 'shape', type(value).__name__)}")
    step = entry.get("step")
    if not (isinstance(step, (torch.Tensor, numbers.Real)) and torch.as_tensor(step).numel() == 1):
        raise ValueError(f"{where}: step must be a number or a one-element tensor")


def check_master_entry(value: Any, shape: Sequence[int], dtype: torch.dtype | None, where: str) -> None:
    """ValueError unless ``value`` (a state entry's :data:`MASTER_KEY`) is a tensor of ``shape`` and
    ``dtype`` (float32 masters, int16 remainders), as a parameter whose bucket keeps that needs it;
    ``dtype`` None: the parameter keeps no master and the value is dropped, whatever it is."""
    if dtype is None:
        return
    kind = "fp32 master" if dtype == torch.float32 else "int16 remainders (store_param_remainders=True)"
    if not isinstance(value, torch.Tensor) or value.shape != tuple(shape) or value.dtype != dtype:
        got = (f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor)
               else type(value).__name__)
        hint = ""
        if isinstance(value, torch.Tensor) and {value.dtype, dtype} == {torch.float32, torch.int16}:
            hint = (" (a checkpoint of an optimizer with the other store_param_remainders: build this one the same "
                    "way, or delete the entries' 'master_param' to start the masters from the parameters)")
        elif isinstance(value, torch.Tensor) and value.dtype != dtype:
            hint = (" (torch.optim.RAdam casts it to the parameter's dtype on load and never updates it: delete "
                    "the entries' 'master_param' to start the masters from the parameters)")
        raise ValueError(f"{where}: {MASTER_KEY} must be the parameter's {kind}, a {dtype} tensor of shape "
                         f"{tuple(shape)}, got {got}{hint}")


def checked_gradient(grad: torch.Tensor, where: str, dtype: torch.dtype, device: torch.device,
                     local_shape: torch.Size | None = None) -> torch.Tensor:
    """``grad`` checked as the gradient of a parameter of ``dtype`` on ``device`` (named ``where``):
    RuntimeError if it is sparse or of another dtype or device. With ``local_shape`` (a DTensor
    parameter's local shard) its local shard is checked against that shape and returned."""
    if local_shape is not None:
        grad = local_tensor(grad)
        if grad.shape != local_shape:
            raise RuntimeError(f"{where}: local gradient shard of shape {tuple(grad.shape)} does not match the "
                               f"local parameter shard {tuple(local_shape)}")
    if grad.layout is not torch.strided:
        raise RuntimeError(f"{where} has a sparse gradient; RAdam does not support sparse gradients")
    if grad.dtype != dtype or grad.device != device:
        # the tensor-list step reads the gradient through its address, as this bucket's dtype
        raise RuntimeError(f"{where} has a {grad.dtype} gradient on {grad.device}; its buffer holds {dtype} "
                           f"on {device}")
    return grad


def storage_of(t: Any) -> int | None:
    """The address of the storage under tensor ``t`` (a DTensor's local shard's), None for anything
    else and for empty tensors."""
    if not isinstance(t, torch.Tensor):
        return None
    t = local_tensor(t)
    return t.untyped_storage().data_ptr() if t.numel() and t.layout is torch.strided else None


def memory_overlap(tensors: Sequence[torch.Tensor]) -> tuple[int, int] | None:
    """The positions (in order) of two of ``tensors`` whose memory overlaps (e.g. two Parameter
    objects over one storage, or views of one tensor), or None. Each tensor counts as the span from
    its first to its last element; DTensors (their local shards live in their engine's storage) and
    empty tensors are left out."""
    spans = []
    for k, t in enumerate(tensors):
        if t.numel() == 0 or t.layout is not torch.strided or is_dtensor(t):
            continue
        start = t.data_ptr()
        extent = (1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))) * t.element_size()
        spans.append((t.device.type, t.device.index if t.device.index is not None else -1, start, start + extent, k))
    spans.sort()
    previous = None
    for device_type, index, start, end, k in spans:
        if previous is not None and previous[:2] == (device_type, index) and start < previous[2]:
            return min(previous[3], k), max(previous[3], k)
        if previous is None or previous[:2] != (device_type, index) or end > previous[2]:
            previous = (device_type, index, end, k)
    return None


def _stream(device: torch.device) -> Any:
    """On CUDA: ``device`` current in CuPy, with torch's current stream as CuPy's (nothing on the CPU)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    context = contextlib.ExitStack()
    context.enter_context(cupy.cuda.Device(index))
    context.enter_context(cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream, index))
    return context


def _backend(device: torch.device) -> Any:
    """The backend module for ``device``: Numba for the CPU, CuPy's CUDA backend for CUDA."""
    if device.type == "cpu":
        return backends.get("numba")
    try:
        return backends.get("cuda")
    except ImportError as error:
        raise ImportError(f"CUDA parameters need CuPy (pip install cupy-cuda12x or cupy-cuda13x): {error}") from error


class FlatBucket:
    """The parameters of one device and dtype, packed into flat buffers; ``p.data`` are views.

    Parameters
    ----------
    params : sequence of torch.Tensor
        The parameters, all of one device and dtype, in param-group order.
    groups : sequence of int
        Each parameter's group index.
    capturable : bool
        Keep the step counts on the parameters' device (CUDA) instead of the CPU.
    describe : callable
        ``describe(p)`` names a parameter in error messages.
    changes : Changes
        The optimizer's count of changes made by hand, held by the state entries made here.
    keeping : {None, "master", "remainders", "stochastic"}
        How 16-bit parameters keep their fp32 values (:data:`KEEPINGS`): ``"master"`` an fp32
        master per element (bfloat16/float16 parameters), ``"remainders"`` int16 remainders
        (bfloat16), both in a flat buffer beside the parameters, state key :data:`MASTER_KEY`;
        ``"stochastic"`` (bfloat16) rounds each step's result stochastically with ``round_seed``.
        A master starts from its parameter's values at the parameter's first step with fresh
        state (so weights loaded into the model after the optimizer was built are taken); a
        remainder starts at zero (the master then equals the parameter).
    round_seed : int, optional
        The seed of ``"stochastic"`` rounding.
    sharded : bool
        The parameters are DTensors (FSDP2): the buffers cover their *local* shards, the
        parameters stay where their engine keeps them (FSDP2 all-gathers from its own padded
        shard storage, so ``p.data`` is never re-pointed) and every step takes the tensor-list
        path over the local parameter and gradient shards, with the moments in flat buffers.
        State entries are DTensors over the moment views (``torch.distributed.checkpoint``
        reshards them).
    """

    def __init__(self, params: Sequence[torch.Tensor], groups: Sequence[int], *, capturable: bool,
                 describe: Callable[[torch.Tensor], str], changes: Changes, sharded: bool = False,
                 keeping: str | None = None, round_seed: int | None = None) -> None:
        self.params = list(params)
        self.device, self.dtype = self.params[0].device, self.params[0].dtype
        if keeping not in KEEPINGS or (keeping is not None and self.dtype not in SIXTEEN_BIT) or (
                keeping in ("remainders", "stochastic") and self.dtype != torch.bfloat16):
            raise ValueError(f"keeping {keeping!r} is not for {self.dtype} parameters")
        if keeping == "stochastic" and capturable:
            raise ValueError("stochastic rounding needs host step counts: not with capturable=True")
        self.keeping = keeping
        self.round_seed = round_seed if keeping == "stochastic" else None
        self.capturable = capturable
        self.describe = describe
        self.changes = changes
        self.sharded = sharded
        if sharded and capturable:
            raise ValueError("capturable=True is not supported for DTensor (FSDP2) parameters")
        #: complex parameters: the buffers hold their real views (a trailing axis of 2), ``p.data``,
        #: the gradient views and the state's moments are complex views of them (:meth:`_unpack`)
        self.complex = self.dtype.is_complex
        self.storage_dtype = STORAGE_DTYPE.get(self.dtype, self.dtype)
        self.moment_dtype = MOMENT_DTYPE.get(self.dtype, self.storage_dtype)
        extra = (2,) if self.complex else ()
        self.layout = FlatLayout([tuple(local_tensor(p).shape) + extra for p in self.params], groups=groups)
        kwargs = {"dtype": self.storage_dtype, "device": self.device}
        moments = {"dtype": self.moment_dtype, "device": self.device}
        # Sharded: the parameters are not copied in; a zero-length stand-in keeps the attributes uniform.
        self.param_flat = torch.zeros(0 if sharded else self.layout.size, **kwargs)
        self.exp_avg_flat = torch.zeros(self.layout.size, **moments)
        self.exp_avg_sq_flat = torch.zeros(self.layout.size, **moments)
        self.grad_flat: torch.Tensor | None = None
        #: The fp32 masters or int16 remainders (:data:`MASTER_KEY`), None without them.
        keeper_dtype = KEEPER_DTYPE.get(keeping)
        self.keeper_flat = None if keeper_dtype is None else torch.zeros(self.layout.size, dtype=keeper_dtype,
                                                                           device=self.device)
        self.keeper_views = None if keeper_dtype is None else self.layout.unpack(self.keeper_flat)
        #: Per parameter, whether its fp32 master is still to be taken from its values (at its next step).
        self.needs_master = np.ones(len(self.params), dtype=bool) if keeping == "master" else None
        self.steps = torch.zeros(len(self.params), dtype=scalar_dtype(), device=self.device if capturable else "cpu")
        #: Whether the optimizer's state holds an entry (views into these buffers) for each parameter.
        self.has_state = np.zeros(len(self.params), dtype=bool)
        self.param_views = [local_tensor(p) for p in self.params] if sharded else self._unpack(self.param_flat)
        self.exp_avg_views = self._unpack(self.exp_avg_flat)
        self.exp_avg_sq_views = self._unpack(self.exp_avg_sq_flat)
        self.grad_views: list[torch.Tensor] | None = None
        #: Whether ``zero_grad(set_to_none=False)`` made the gradients views of ``grad_flat``.
        self.grads_adopted = False
        self.param_ptrs = [v.data_ptr() for v in self.param_views]
        self.grad_ptrs: list[int] | None = None
        self.on_cpu = self.device.type == "cpu"
        #: tensor -> what the backend takes (chosen once: a step's conversions do no dtype dispatch)
        self._array = _array_maker(self.on_cpu, self.complex, self.storage_dtype == torch.bfloat16)
        self.backend = _backend(self.device)
        flats = (self.param_flat, self.exp_avg_flat, self.exp_avg_sq_flat)
        # the backend's arrays over the flat buffers, made once (a step converts nothing of its own),
        # on torch's stream: the steps run there, so no cross-stream ordering is needed or made.
        # 16-bit buffers go to the plans as they are (ml_dtypes/torch dtypes): the backends' arrays of
        # them are bit views, which no longer say their format; the plans convert them once, at binding.
        self._kernel_arrays = self.backend.as_arrays if self.storage_dtype not in SIXTEEN_BIT else list
        with _stream(self.device):
            self.arrays = self._kernel_arrays([self._array(t) for t in flats])
            self.steps_array = self.backend.as_array(self.steps) if capturable else None
        self.grad_array: Any = None
        self.segment_arrays = [None if sharded and k == 0 else self.layout.unpack(a) for k, a in enumerate(self.arrays)]
        # the master/remainder buffer as the plans take it (beside 16-bit params: as it is, a NumPy view on the CPU)
        self.keeper_array = None if self.keeper_flat is None else (
            self.keeper_flat.numpy() if self.on_cpu else self.keeper_flat)
        self.keeper_segments = None if self.keeper_array is None else self.layout.unpack(self.keeper_array)
        self.steps_host = None if capturable else self.steps.numpy()
        #: Whether fresh gradients are copied into the flat gradient buffer for the layout step rather
        #: than stepped where they are (the tensor list): on CUDA always (the copy is cheaper than the
        #: list's per-tensor host work), on the CPU for small buckets (:data:`GATHER_BELOW`).
        self.gathers = not sharded and (not self.on_cpu or self.layout.size <= GATHER_BELOW)
        #: The step plans, bound on first use: over the flat buffers, and over the tensor views.
        self._plan: StepPlan | None = None
        self._tensors: StepPlan | None = None
        self._shard_groups: list | None = None  # (:meth:`shard_groups`)

    # -- moving in ---------------------------------------------------------------------------

    def adopt(self, state: dict, incoming: list, grad_views: bool) -> None:
        """Copy each parameter (and its state, as :meth:`read_state` read it into ``incoming``) into the
        buffers and point ``p.data`` there.

        The entries of ``state`` come to view the buffers (as :meth:`write_state`). With
        ``grad_views``, existing gradients are copied into a flat gradient buffer too and ``p.grad``
        become its views.
        """
        if not self.sharded:
            for i, p in enumerate(self.params):
                self.param_views[i].copy_(p.data)
                p.data = self.param_views[i]
        self.write_state(state, incoming)
        if self.sharded:
            return
        if grad_views:
            self.adopt_grads(copy=True)

    def storages(self) -> set[int]:
        """The addresses of the storages that :meth:`write_state` writes (moments, step counts, masters)."""
        return {storage_of(t) for t in (self.exp_avg_flat, self.exp_avg_sq_flat, self.steps, self.keeper_flat)} - {None}

    def read_state(self, state: Mapping[torch.Tensor, Any], written: set[int]) -> list[tuple | None]:
        """Each parameter's entry in ``state``, checked, with the values to copy in (nothing written):
        None where it has none or an empty one (it starts from fresh state at its next step, as
        torch's lazy initialisation), else ``(entry, (exp_avg, exp_avg_sq, step, master))``, a value
        None where it is the parameter's own view already, the master :data:`_ABSENT` where the
        bucket keeps none or the entry has none (:data:`MASTER_KEY`). A value over one of the storages ``written``
        (those of every bucket about to be written, :meth:`storages`), e.g. another parameter's
        view, is copied here, so that no bucket's writes change what another one then reads."""
        incoming = []
        for i, p in enumerate(self.params):
            entry = state.get(p)
            if entry is not None and not (isinstance(entry, Mapping) and len(entry) == 0):
                where = f"optimizer state of {self.describe(p)}"
                check_state_entry(entry, p.shape, where)
                targets = (self.exp_avg_views[i], self.exp_avg_sq_views[i], self.steps[i])
                values = tuple(_source(entry[name], target, written)
                               for name, target in zip(("exp_avg", "exp_avg_sq", "step"), targets))
                master = _ABSENT
                if self.keeper_views is not None and MASTER_KEY in entry:
                    check_master_entry(entry[MASTER_KEY], p.shape, self.keeper_flat.dtype, where)
                    master = _source(entry[MASTER_KEY], self.keeper_views[i], written)
                incoming.append((entry, values + (master,)))
            else:
                incoming.append(None)
        return incoming

    def write_state(self, state: dict, incoming: list[tuple | None]) -> None:
        """Copy the :meth:`read_state` ``incoming`` values into the moments and steps (zero moments and
        step 0 where None) and point each entry of ``state`` at views of them (other keys are kept):
        this optimizer's :class:`StateEntry` in place, any other dict through a new
        :class:`StateEntry` (an empty entry too, so that filling it later counts as a change)."""
        kept = set()
        for i, (p, item) in enumerate(zip(self.params, incoming)):
            self.has_state[i] = item is not None
            master = _ABSENT if item is None else item[1][3]
            if self.keeping == "remainders" and master is _ABSENT:
                self.keeper_views[i].zero_()  # the master is the parameter's value, whenever it is loaded
            elif self.keeping == "master":
                self.needs_master[i] = master is _ABSENT  # taken from the parameter at its next step
            if item is None:
                self.exp_avg_views[i].zero_()
                self.exp_avg_sq_views[i].zero_()
                self.steps[i] = 0.0
                empty = state.get(p)
                if empty is not None and not self._owns(empty):
                    state[p] = StateEntry(self.changes)
                continue
            entry, values = item
            targets = (self.exp_avg_views[i], self.exp_avg_sq_views[i], self.steps[i],
                       None if self.keeper_views is None else self.keeper_views[i])
            for target, value in zip(targets, values):
                if value is not None and value is not _ABSENT:
                    target.copy_(value)
            views = self._views(i)
            if self._owns(entry) and id(entry) not in kept:  # (an entry shared by two: copied)
                if MASTER_KEY not in views:
                    dict.pop(entry, MASTER_KEY, None)  # no master here (none kept, or not taken yet): none shown
                dict.update(entry, views)  # in place, uncounted
                kept.add(id(entry))
            else:
                state[p] = StateEntry(self.changes, {**{k: v for k, v in entry.items() if k != MASTER_KEY}, **views})

    def take_masters(self, active: np.ndarray, state: Mapping[torch.Tensor, Any]) -> None:
        """Before a step of the parameters in ``active``: the fp32 masters still to be taken
        (:attr:`needs_master`) copied from their parameters' values, and shown in their state
        entries (those of this optimizer; new entries get them from :meth:`state_entry`)."""
        if self.needs_master is None:
            return
        fresh = active & self.needs_master
        if not fresh.any():
            return
        for i in np.flatnonzero(fresh).tolist():
            self.keeper_views[i].copy_(self.param_views[i])
            self.needs_master[i] = False
            entry = state.get(self.params[i])
            if self._owns(entry):
                dict.__setitem__(entry, MASTER_KEY, self._views(i)[MASTER_KEY])  # uncounted: ours

    def set_round_seed(self, seed: int) -> None:
        """A new stochastic-rounding seed (a loaded state's): the plans are bound again with it."""
        if self.keeping == "stochastic" and seed != self.round_seed:
            self.round_seed = seed
            self._plan = self._tensors = None

    def _owns(self, entry: Any) -> bool:
        """Whether ``entry`` is a :class:`StateEntry` of this optimizer (counting in its :class:`Changes`)."""
        return type(entry) is StateEntry and entry._changes is self.changes

    def release(self, params: Sequence[torch.Tensor], state: Mapping[torch.Tensor, Any]) -> None:
        """Parameters of this bucket that left the optimizer (removed from their group by hand) get
        their own copies of what views these buffers: ``p.data``, a ``p.grad`` viewing the flat
        gradient buffer, and the tensors of their ``state`` entry (in place in the entry, which
        torch keeps), so that nothing keeps the buffers alive."""
        ours = {storage_of(t) for t in (self.param_flat, self.exp_avg_flat, self.exp_avg_sq_flat, self.steps,
                                        self.grad_flat, self.keeper_flat)} - {None}
        for p in params:
            if not self.sharded and storage_of(p.data) in ours:
                p.data = p.data.clone()
            if storage_of(p.grad) in ours:
                p.grad = p.grad.clone()
            entry = state.get(p)
            if isinstance(entry, dict):
                dict.update(entry, {name: value.clone() for name, value in entry.items() if storage_of(value) in ours})

    def state_entry(self, i: int) -> StateEntry:
        """Parameter ``i``'s optimizer state, in torch.optim.RAdam's format, as views into the buffers."""
        return StateEntry(self.changes, self._views(i))

    def _views(self, i: int) -> dict[str, torch.Tensor]:
        """Parameter ``i``'s ``step``, ``exp_avg`` and ``exp_avg_sq`` (and its :data:`MASTER_KEY`, where
        the bucket keeps one and it has been taken): views into the buffers.

        For a DTensor parameter the moments (and master) are DTensors of its mesh and placements over
        the local views (no copy), as torch.optim.RAdam's ``zeros_like(p)`` state is.
        """
        tensors = {"exp_avg": self.exp_avg_views[i], "exp_avg_sq": self.exp_avg_sq_views[i]}
        if self.keeper_views is not None and (self.needs_master is None or not self.needs_master[i]):
            tensors[MASTER_KEY] = self.keeper_views[i]
        if self.sharded:
            from torch.distributed.tensor import DTensor

            p = self.params[i]
            tensors = {name: DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                                stride=p.stride()) for name, view in tensors.items()}
        return {"step": self.steps[i], **tensors}

    def adopt_grads(self, copy: bool) -> None:
        """Point every existing ``p.grad`` at a view of the flat gradient buffer (allocated here).

        With ``copy`` the gradient values carry over; without, the views are left to be zeroed.
        """
        self._allocate_grad_flat()
        self.grads_adopted = True
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is not None and not self._is_grad_view(i, grad):
                if copy:
                    self.grad_views[i].copy_(grad)
                p.grad = self.grad_views[i]

    def _allocate_grad_flat(self) -> None:
        """The flat gradient buffer, its per-parameter views and the backend's array of it (once)."""
        if self.grad_flat is None:
            self.grad_flat = torch.zeros(self.layout.size, dtype=self.storage_dtype, device=self.device)
            self.grad_views = self._unpack(self.grad_flat)
            self.grad_ptrs = [v.data_ptr() for v in self.grad_views]
            with _stream(self.device):
                self.grad_array = self._kernel_arrays([self._array(self.grad_flat)])[0]

    def _unpack(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """The per-parameter views of a flat buffer, complex views of the real segments for complex parameters."""
        views = self.layout.unpack(flat)
        return list(map(torch.view_as_complex, views)) if self.complex else views

    def _foreign_view(self, grad: torch.Tensor | None) -> bool:
        """A gradient that views some other buffer than ours (e.g. a DDP bucket with gradient_as_bucket_view)."""
        if grad is None or grad._base is None:
            return False
        return self.grad_flat is None or grad.untyped_storage().data_ptr() != self.grad_flat.untyped_storage().data_ptr()

    def _is_grad_view(self, i: int, grad: torch.Tensor) -> bool:
        return (self.grad_ptrs is not None and grad.layout is torch.strided and grad.data_ptr() == self.grad_ptrs[i]
                and grad.dtype == self.dtype and grad.is_contiguous())

    def zero_grad(self, set_to_none: bool) -> None:
        """torch's ``zero_grad``: drop the gradients, or zero them as one memset of the flat buffer."""
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        if all(p.grad is None for p in self.params):
            return
        if self.sharded or any(self._foreign_view(p.grad) for p in self.params):
            # FSDP2's sharded gradients, or gradients that are views of an engine's buckets (DDP's
            # gradient_as_bucket_view): zeroed where they are, so autograd keeps accumulating there.
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_()
            return
        self.adopt_grads(copy=False)
        self.grad_flat.zero_()

    # -- stepping ----------------------------------------------------------------------------

    def check_gradients(self) -> tuple[np.ndarray, list[torch.Tensor | None] | None]:
        """Check every parameter and gradient (no writes) for one step.

        Returns the per-parameter ``has_grad`` mask and, when some gradient is not a view of the
        flat gradient buffer, the gradients (``None`` where absent); ``None`` when all are views.
        """
        if self.sharded:
            self._follow_local_shards()
        elif [p.data_ptr() for p in self.params] != self.param_ptrs:
            p = next(p for p, ptr in zip(self.params, self.param_ptrs) if p.data_ptr() != ptr)
            raise RuntimeError(
                f"{self.describe(p)} no longer lives in the optimizer's flat buffer on {self.device} "
                f"(it is now on {p.device}, {p.dtype}): it was moved or its .data replaced after "
                "fastradam.torch.RAdam was built (e.g. model.to(...), .cuda(), .double()); "
                "move the model first, then build the optimizer"
                "; under ZeroRedundancyOptimizer use parameters_as_bucket_view=False (the default): "
                "ZeRO re-points each parameter into its own buckets, and fastradam already keeps "
                "each rank's shard in flat buffers")
        grads = [p.grad for p in self.params]
        active = np.array([grad is not None for grad in grads], dtype=bool)
        if not self.sharded and all(grad is None or self._is_grad_view(i, grad) for i, grad in enumerate(grads)):
            return active, None  # views of the flat gradient buffer: this buffer's dtype and device
        for i, (p, grad) in enumerate(zip(self.params, grads)):
            if grad is not None:
                grads[i] = checked_gradient(grad, self.describe(p), self.dtype, self.device,
                                            self.param_views[i].shape if self.sharded else None)
        return active, grads

    def _follow_local_shards(self) -> None:
        """FSDP2 re-pads a local shard it finds replaced (load_state_dict(assign=True), _apply):
        follow a moved shard of the same shape; refuse one whose shape or layout changed."""
        for i, p in enumerate(self.params):
            local = local_tensor(p)
            if local.data_ptr() != self.param_ptrs[i] or local.shape != self.param_views[i].shape:
                if local.shape != self.param_views[i].shape or not local.is_contiguous():
                    raise RuntimeError(
                        f"{self.describe(p)}: its local shard changed shape or layout ({tuple(local.shape)}, "
                        f"was {tuple(self.param_views[i].shape)}) after fastradam.torch.RAdam was built; "
                        "shard the model first, then build the optimizer")
                self.param_views[i] = local
                self.param_ptrs[i] = local.data_ptr()
                self._tensors = None  # bound to the old shard

    def prepare(self, active: np.ndarray, grads: list | None, groups: list[GroupOptions],
                lrs: list[Any], grad_scale: float = 1.0, clip: Mapping[str, Any] | None = None,
                gathered: bool = False) -> Callable[[], None]:
        """Every check of one fused step of the parameters in ``active`` (a checked
        :meth:`check_gradients`), and the step itself, not yet taken: calling it writes the
        parameters and moments and advances the step counts. ``groups`` are the validated options of every
        param group (host lrs), ``lrs`` their learning rates as given (tensors where capturable).
        ``grad_scale`` divides the gradients inside the step (AMP's scale, folded in); ``clip`` is the
        plans' clipping arguments (``max_grad_norm``, ``norm_type``, ``grad_norm``: a norm computed
        before, so no pre-pass runs here). ``gathered``: :meth:`grad_norms` already copied these fresh
        gradients into the flat gradient buffer (the caller checked that they are the same gradients)."""
        count = int(np.count_nonzero(active))
        if count == 0:
            return _nothing
        every = count == active.size
        extra = {} if clip is None else dict(clip)
        if grad_scale != 1.0:
            extra["grad_scale"] = grad_scale
        with _stream(self.device):
            if self.capturable:
                return self._prepare_capturable(active, every, None if gathered else grads, groups, lrs, extra)
            has_grad = None if every else active  # (the plan's own all-active mask)
            steps = self.steps_host.astype(np.int64) + active
            # gradients that view an engine's buffers (DDP's gradient_as_bucket_view) are stepped where they
            # are on the CPU, never copied; fresh ones of a small bucket are gathered
            gather = self._gathers(grads)
            if grads is not None and not gather:
                launch = self._tensor_plan(groups).prepare(steps=steps, has_grad=has_grad, groups=groups,
                                                           grads=self._grad_arrays(grads), **extra)
            else:
                launch = self._layout_plan(groups).prepare(steps=steps, has_grad=has_grad, groups=groups, **extra)

        copy = gather and not gathered

        def step() -> None:
            with _stream(self.device):
                if copy:
                    self._gather_grads(active, grads)
                launch()
            if every:
                self.steps_host += 1
            else:
                self.steps_host[active] += 1
        return step

    def _gathers(self, grads: list | None) -> bool:
        """Whether a step copies these fresh gradients into the flat gradient buffer (the layout step)
        rather than stepping them where they are (the tensor list): :attr:`gathers`, except that on
        the CPU gradients that view an engine's buffers (DDP's gradient_as_bucket_view) are never copied."""
        return grads is not None and self.gathers and not (
            self.on_cpu and any(grad is not None and grad._base is not None for grad in grads))

    def _grad_arrays(self, grads: list) -> list:
        """Fresh gradients as the tensor-list plan takes them (None where absent)."""
        return [None if grad is None else self._array(self._grad_tensor(grad)) for grad in grads]

    # -- clipping ----------------------------------------------------------------------------

    def grad_norms(self, active: np.ndarray, grads: list | None, groups: list[GroupOptions], norm_type: float,
                   grad_scale: float, masks: Sequence[np.ndarray | None] = (None,)) -> tuple[list[Any], bool]:
        """The norms of the unscaled active gradients (a checked :meth:`check_gradients`), one per mask
        of ``masks`` (the parameters where it is True; None: all), read exactly as the next step
        reads them: no gradient is written. Fresh gradients that the step would gather into the
        flat gradient buffer are gathered now instead (the same ``_foreach_copy_``, into this
        bucket's own buffer) and read there; the second value says so, and the step then skips
        its copy (``prepare(gathered=True)``). Others are read where they are (the tensor-list
        plan). Each norm is a float on the CPU, a 0-d float64 tensor on CUDA (no sync).

        Complex gradients are stepped as their real views; their 2-norm is the real view's, but other
        norms are of the complex magnitudes (torch's): those are computed here with torch."""
        norms = []
        gathered = self._gathers(grads) and bool(active.any())
        with _stream(self.device):
            if gathered:
                self._gather_grads(active, grads)
            for mask in masks:
                used = active if mask is None else active & mask
                if not used.any():
                    norms.append(0.0 if self.on_cpu else torch.zeros((), dtype=torch.float64, device=self.device))
                    continue
                has_grad = None if used.all() else used
                if self.complex and norm_type != 2.0:
                    value = self._complex_norm(used, grads, norm_type, grad_scale)
                elif grads is None or gathered:
                    value = self._layout_plan(groups).grad_norm(norm_type, has_grad=has_grad, grad_scale=grad_scale)
                else:
                    value = self._tensor_plan(groups).grad_norm(
                        norm_type, has_grad=has_grad, grad_scale=grad_scale,
                        grads=self._grad_arrays([grad if used[i] else None for i, grad in enumerate(grads)]))
                norms.append(float(value) if self.on_cpu else torch.as_tensor(value, device=self.device))
        return norms, gathered

    def _complex_norm(self, used: np.ndarray, grads: list | None, norm_type: float, grad_scale: float) -> Any:
        """The ``norm_type`` norm of the complex gradients in ``used`` (their magnitudes), in float64."""
        tensors = [self.grad_views[i] if grads is None else grads[i] for i in np.flatnonzero(used).tolist()]
        norms = torch.stack([torch.linalg.vector_norm(t.to(torch.complex128), norm_type) for t in tensors])
        return torch.linalg.vector_norm(norms, norm_type) / grad_scale

    def grad_fingerprint(self, active: np.ndarray, grads: list | None) -> tuple:
        """What says that the gradients a step would take (a :meth:`check_gradients`) are still the
        ones seen now: the mask, and each gradient's identity (a weak reference) and version counter
        (autograd's accumulation, ``mul_``, ``copy_`` bump it; views of the flat gradient buffer share
        its counter). Compared by :meth:`same_gradients`."""
        if grads is None:
            return active.tobytes(), None if self.grad_flat is None else self.grad_flat._version
        return active.tobytes(), [(weakref.ref(grad), grad._version) for grad in grads if grad is not None]

    def same_gradients(self, fingerprint: tuple, active: np.ndarray, grads: list | None) -> bool:
        """Whether :meth:`grad_fingerprint` of these gradients would be ``fingerprint``."""
        mask, seen = fingerprint
        if mask != active.tobytes() or (grads is None) != (not isinstance(seen, list)):
            return False
        if grads is None:
            return seen == (None if self.grad_flat is None else self.grad_flat._version)
        present = [grad for grad in grads if grad is not None]
        return len(present) == len(seen) and all(ref() is grad and grad._version == version
                                                 for grad, (ref, version) in zip(present, seen))

    def shard_groups(self) -> list[tuple[Any, tuple[int, ...], np.ndarray | None]]:
        """How this bucket's norm is reduced across ranks: ``(mesh, dims, mask)`` per set of
        parameters sharing a DTensor device mesh and the mesh dimensions they are sharded over
        (the norm**p is summed over those dimensions' process groups, as FSDP2's clipping does;
        replicated dimensions hold the same values on every rank); ``[(None, (), None)]`` for plain
        tensors. Found once (placements do not change)."""
        if self._shard_groups is None:
            if not self.sharded:
                self._shard_groups = [(None, (), None)]
            else:
                keys: dict[tuple, tuple] = {}
                for i, p in enumerate(self.params):
                    dims = tuple(d for d, placement in enumerate(p.placements) if placement.is_shard())
                    mesh, _, mask = keys.setdefault((id(p.device_mesh), dims), (p.device_mesh, dims,
                                                                               np.zeros(len(self.params), bool)))
                    mask[i] = True
                self._shard_groups = [(mesh, dims, None if mask.all() else mask) for mesh, dims, mask in keys.values()]
        return self._shard_groups

    def _layout_plan(self, groups: list[GroupOptions]) -> StepPlan:
        """The plan over the flat buffers (gradients: the flat gradient buffer), bound once."""
        if self._plan is None:
            self._allocate_grad_flat()
            params, exp_avg, exp_avg_sq = self.arrays
            self._plan = StepPlan(params, self.grad_array, exp_avg, exp_avg_sq, layout=self.layout, groups=groups,
                                  **self._keeping_arguments(self.keeper_array))
        return self._plan

    def _tensor_plan(self, groups: list[GroupOptions]) -> StepPlan:
        """The plan over the parameter and moment views (the local shards for DTensors), gradients
        given at each step as they are (no copy); bound again when a local shard moved."""
        if self._tensors is None:
            if self.sharded:
                params = [self._array(view) for view in self.param_views]
            else:
                params = self.segment_arrays[0]
            self._tensors = StepPlan(params, None, self.segment_arrays[1], self.segment_arrays[2], groups=groups,
                                     group_index=self.layout.arrays.groups,
                                     **self._keeping_arguments(self.keeper_segments))
        return self._tensors

    def _keeping_arguments(self, keeper: Any) -> dict[str, Any]:
        """The plans' arguments for :attr:`keeping` (``keeper``: the master/remainder buffer or its segments).
        Both plans count the global element index over the same tensors in order, so stochastic
        rounding draws the same bits whichever of them steps."""
        if self.keeping == "master":
            return {"master_params": keeper}
        if self.keeping == "remainders":
            return {"param_remainders": keeper}
        if self.keeping == "stochastic":
            return {"stochastic_round_seed": self.round_seed}
        return {}

    def _grad_tensor(self, grad: torch.Tensor) -> torch.Tensor:
        if grad.requires_grad:
            grad = grad.detach()
        return grad if grad.is_contiguous() else grad.contiguous()

    def _gather_grads(self, active: np.ndarray, grads: list) -> None:
        """The active fresh gradients copied into the flat gradient buffer, in one ``_foreach_copy_``
        (``p.grad`` is left as it is; gradients that already are its views are not copied)."""
        self._allocate_grad_flat()
        pairs = [(self.grad_views[i], grad) for i in np.flatnonzero(active).tolist()
                 if (grad := grads[i]).data_ptr() != self.grad_ptrs[i]]  # a view of its own slot: nothing to copy
        if pairs:
            torch._foreach_copy_([view for view, _ in pairs], [grad for _, grad in pairs])

    def _prepare_capturable(self, active: np.ndarray, every: bool, grads: list | None, groups: list[GroupOptions],
                            lrs: list[Any], extra: Mapping[str, Any]) -> Callable[[], None]:
        """capturable: the step counts advance on the device, then one launch over the flat buffers
        reads them (and any tensor lr) there; fresh gradients are gathered into the flat gradient
        buffer first, gradient views are read in place. ``every``: all of ``active`` is set;
        ``extra``: the plan's ``grad_scale`` and clipping arguments."""
        plan = self._layout_plan(groups)
        launch = plan.prepare(steps=self.steps_array, has_grad=active, groups=groups, lrs=lrs, **extra)

        def step() -> None:
            with _stream(self.device):
                if grads is not None:
                    self._gather_grads(active, grads)
                if every:
                    self.steps.add_(1.0)
                else:
                    torch._foreach_add_([self.steps[i] for i in np.flatnonzero(active)], 1.0)
                launch()
        return step


def _array_maker(on_cpu: bool, complex_: bool, bfloat16: bool) -> Callable[[torch.Tensor], Any]:
    """The conversion of a bucket's tensors to what the backends take, zero-copy: a NumPy view on the
    CPU (bfloat16 tensors, which have no ``.numpy()``, as their 16-bit integers viewed as
    ``ml_dtypes.bfloat16``), the torch tensor itself on CUDA; complex tensors as their real views."""
    if on_cpu and bfloat16:
        try:
            import ml_dtypes
        except ImportError as error:
            raise ImportError(f"bfloat16 parameters on the CPU need ml_dtypes (pip install ml_dtypes): "
                              f"{error}") from error

        def convert(tensor: torch.Tensor) -> Any:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    elif on_cpu:
        convert = torch.Tensor.numpy
    else:
        def convert(tensor: torch.Tensor) -> Any:
            return tensor
    if not complex_:
        return convert
    return lambda tensor: convert(torch.view_as_real(tensor) if tensor.is_complex() else tensor)


def _source(value: Any, target: torch.Tensor, written: set[int]) -> torch.Tensor | None:
    """What :meth:`FlatBucket.write_state` copies into ``target`` from a state ``value``: None when it is
    ``target`` itself (nothing to copy), a copy when it lies in one of the storages ``written``
    (read before any write), else the value as a tensor of ``target``'s shape."""
    value = local_tensor(value) if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    value = value.reshape(target.shape)
    if value.device == target.device and value.numel() and (value.data_ptr(), value.stride(), value.dtype) == (
            target.data_ptr(), target.stride(), target.dtype):
        return None  # this parameter's own view: nothing to copy
    return value.clone() if storage_of(value) in written else value


#: :meth:`FlatBucket.read_state`'s master of an entry without one (or of a bucket that keeps none).
_ABSENT = object()


def _nothing() -> None:
    """The step of a bucket with no gradient this time."""
