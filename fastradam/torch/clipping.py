"""Gradient clipping and AMP unscaling in the drop-in, folded into the next step (issue 19).

:meth:`fastradam.torch.RAdam.clip_grad_norm_` computes the global norm of the gradients the next
step will take (each bucket's plan reads them once, :meth:`FlatBucket.grad_norms`; nothing is
written) and keeps it, with the max norm, as a :class:`Pending` clip: the next step passes
``max_grad_norm``, ``norm_type`` and ``grad_norm=`` to every bucket's plan, which multiplies each
gradient by ``inv_grad_scale * min(1, max_norm / (norm + 1e-6))`` inside its own pass
(:mod:`fastradam.clipping`). :class:`fastradam.torch.GradScaler`'s ``unscale_`` keeps an
:class:`Unscaled` record the same way (the scale and the 2-norm of the unscaled gradients), so
AMP with clipping reads the gradients twice (the pre-pass, the step) and writes them never.

Across ranks (:func:`reduce`): the local norms are combined as ``norm**p`` summed (``max`` for inf)
over the ranks that hold disjoint parts of the model, through ``torch.distributed``, as FSDP2's
clipping does on DTensors: DTensor parameters over the mesh dimensions they are sharded on (by
mesh and placements, automatically), plain ones over the ``process_group`` given (ZeRO's).
Every rank makes the same collectives in the same order: one per (mesh, dimensions) set of the
sharded buckets, in bucket order, then one for the plain ones when a group is given.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fastradam.clipping import check_max_norm, check_norm_type, finish_norm

#: torch's words when ``error_if_nonfinite`` finds a NaN/inf total norm (torch/nn/utils/clip_grad.py).
NONFINITE = ("The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
             "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
             "`error_if_nonfinite=False`")
#: The real dtype of a complex gradient's norm (torch's).
REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


@dataclass(frozen=True)
class Contribution:
    """One set of local norms to combine: of plain tensors (``mesh`` None: reduced over the
    ``process_group`` given, if any) or of DTensor shards of ``mesh`` sharded over ``dims``."""

    mesh: Any
    dims: tuple[int, ...]
    device: torch.device
    norms: tuple  # floats (CPU buckets) or 0-d float64 tensors (CUDA buckets)


@dataclass(frozen=True)
class Norms:
    """A pre-pass: the local norms of every bucket's active gradients (unscaled by ``grad_scale``),
    the gradients' fingerprints (:meth:`FlatBucket.grad_fingerprint`, per bucket) and the
    total norm reduced with ``process_group`` (None: only DTensor shards reduced)."""

    norm_type: float
    grad_scale: float
    contributions: tuple[Contribution, ...]
    buckets: tuple  # the buckets, compared by identity
    fingerprints: tuple
    gathered: tuple  # per bucket: its fresh gradients were copied into its flat gradient buffer
    total: Any  # a float, or a 0-d float64 tensor on a CUDA device
    process_group: Any
    dtype: torch.dtype  # of the returned total (torch's: the gradients' promoted dtype)
    device: torch.device  # of the returned total (torch's: the first gradient's device)


@dataclass(frozen=True)
class Pending:
    """A clip to apply at the next step: ``max_norm``, and the :class:`Norms` it clips by."""

    max_norm: float
    norms: Norms


@dataclass(frozen=True)
class Unscaled:
    """What :class:`fastradam.torch.GradScaler`'s ``unscale_`` recorded: the scale the gradients
    carry (divided out inside the next step) and its pre-pass (the 2-norm, whose finiteness was
    the found_inf check)."""

    grad_scale: float
    norms: Norms


def check_clip_arguments(max_norm: Any, norm_type: Any) -> tuple[float, float]:
    """``max_norm`` and ``norm_type`` as floats (torch takes one-element tensors and ``"inf"`` too)."""
    if isinstance(max_norm, torch.Tensor) and max_norm.numel() == 1 and not max_norm.is_complex():
        max_norm = float(max_norm)
    if isinstance(norm_type, torch.Tensor) and norm_type.numel() == 1 and not norm_type.is_complex():
        norm_type = float(norm_type)
    return check_max_norm(max_norm), check_norm_type(norm_type)


def _power(norm: float, norm_type: float) -> float:
    try:
        return norm ** norm_type
    except OverflowError:
        return math.inf


def _host_partial(norms: Sequence[float], norm_type: float) -> float:
    """``sum norm**p`` of host floats (``max`` for inf, NaN if any is NaN)."""
    if norm_type == math.inf:
        return math.nan if any(n != n for n in norms) else max(norms, default=0.0)
    return math.fsum(_power(n, norm_type) for n in norms)


def _device_partial(norms: Sequence[Any], norm_type: float, device: torch.device) -> torch.Tensor:
    """``sum norm**p`` (``max`` for inf) as a 0-d float64 tensor on ``device`` (no sync)."""
    stacked = torch.stack([torch.as_tensor(n, dtype=torch.float64).to(device) for n in norms]) if norms else \
        torch.zeros(1, dtype=torch.float64, device=device)
    if norm_type == math.inf:
        return torch.where(stacked.isnan().any(), torch.nan, stacked.max()) if norms else stacked[0]
    return stacked.pow(norm_type).sum()


def _all_reduce(partial: Any, norm_type: float, groups: Sequence[Any], device: torch.device) -> Any:
    """``partial`` summed (max for inf) over each process group of ``groups`` in turn. inf: the max
    of the non-NaN values and a NaN flag, one MAX all-reduce (a NaN's max is unspecified)."""
    on_host = not isinstance(partial, torch.Tensor)
    value = torch.as_tensor(partial, dtype=torch.float64).to(device)
    if norm_type == math.inf:
        nan = value.isnan()
        packed = torch.stack([torch.where(nan, 0.0, value), nan.to(torch.float64)])
        for group in groups:
            torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX, group=group)
        value = torch.where(packed[1] > 0, torch.nan, packed[0])
    else:
        value = value.reshape(1)
        for group in groups:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM, group=group)
        value = value[0]
    return value.item() if on_host and value.device.type == "cpu" else value


def reduce(contributions: Sequence[Contribution], norm_type: float, process_group: Any) -> Any:
    """The total norm of ``contributions`` across ranks (see the module's docstring): a float when
    everything is on the CPU, else a 0-d float64 tensor on the first CUDA device among them."""
    cuda = next((c.device for c in contributions if c.device.type == "cuda"), None)

    def partial(norms: Sequence[Any], device: torch.device) -> Any:
        if cuda is None and all(isinstance(n, float) for n in norms):
            return _host_partial(norms, norm_type)
        return _device_partial(norms, norm_type, device)

    sums = []
    sharded: dict[tuple, list] = {}
    for c in contributions:
        if c.mesh is not None:
            sharded.setdefault((id(c.mesh), c.dims), [c.mesh, c.dims, c.device, []])[3].extend(c.norms)
    for mesh, dims, device, norms in sharded.values():  # the same sets, in the same order, on every rank
        value = partial(norms, device)
        sums.append(_all_reduce(value, norm_type, [mesh.get_group(d) for d in dims], device) if dims else value)
    plain = [c for c in contributions if c.mesh is None]
    if plain or process_group is not None:
        device = next((c.device for c in plain if c.device.type == "cuda"), cuda or torch.device("cpu"))
        value = partial([n for c in plain for n in c.norms], device)
        sums.append(value if process_group is None else _all_reduce(value, norm_type, [process_group], device))
    if cuda is None and all(isinstance(s, float) for s in sums):
        return finish_norm(_host_partial(sums, norm_type) if norm_type == math.inf else math.fsum(sums), norm_type)
    total = _device_partial(sums, math.inf if norm_type == math.inf else 1.0, cuda or torch.device("cpu"))
    return total if norm_type in (1.0, math.inf) else total.pow(0.5 if norm_type == 2.0 else 1.0 / norm_type)


def compute(optimizer: Any, norm_type: float, grad_scale: float, process_group: Any) -> Norms:
    """The pre-pass over every bucket of ``optimizer`` (a :class:`fastradam.torch.RAdam`): its hand
    changes followed first (as its step does), every gradient checked, then the norms read."""
    checked, _ = optimizer._check_options()
    if optimizer._changed():
        optimizer._follow(gradients=True)
    buckets = tuple(optimizer._packing.buckets)
    contributions, fingerprints, gathered = [], [], []
    dtype = None
    for bucket in buckets:
        active, grads = bucket.check_gradients()
        if active.any():
            real = REAL.get(bucket.dtype, bucket.dtype)
            dtype = real if dtype is None else torch.promote_types(dtype, real)
        shard_groups = bucket.shard_groups()
        norms, copied = bucket.grad_norms(active, grads, checked, norm_type, grad_scale,
                                          [mask for _, _, mask in shard_groups])
        gathered.append(copied)
        fingerprints.append(bucket.grad_fingerprint(active, grads))  # after the gather (views share its counter)
        for (mesh, dims, _), norm in zip(shard_groups, norms):
            contributions.append(Contribution(mesh, dims, bucket.device, (norm,)))
    total = reduce(contributions, norm_type, process_group)
    first = next((p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None), None)
    if first is None:  # torch's total norm of no gradients: torch.tensor(0.0)
        dtype, device = torch.get_default_dtype(), torch.device("cpu")
    else:
        device = first.device
    return Norms(norm_type, grad_scale, tuple(contributions), buckets, tuple(fingerprints), tuple(gathered), total,
                 process_group, dtype, device)


def reuse(optimizer: Any, norms: Norms, norm_type: float, process_group: Any) -> Norms | None:
    """``norms`` (an :class:`Unscaled` pre-pass) as the clip's, when it is of this norm type and the
    gradients are still the ones it read (reduced again over ``process_group`` if that differs)."""
    if norms.norm_type != norm_type or optimizer._changed() or not same_gradients(optimizer, norms):
        return None
    if process_group is norms.process_group:
        return norms
    total = reduce(norms.contributions, norm_type, process_group)
    return Norms(norms.norm_type, norms.grad_scale, norms.contributions, norms.buckets, norms.fingerprints,
                 norms.gathered, total, process_group, norms.dtype, norms.device)


def same_gradients(optimizer: Any, norms: Norms, gradients: Sequence[tuple] | None = None) -> bool:
    """Whether the optimizer's buckets and their gradients are still those ``norms`` read
    (``gradients``: each bucket's :meth:`FlatBucket.check_gradients`, when at hand)."""
    buckets = optimizer._packing.buckets
    if len(buckets) != len(norms.buckets) or not all(a is b for a, b in zip(buckets, norms.buckets)):
        return False
    if gradients is None:
        gradients = [bucket.check_gradients() for bucket in buckets]
    return all(bucket.same_gradients(fingerprint, active, grads)
               for bucket, fingerprint, (active, grads) in zip(buckets, norms.fingerprints, gradients))


def is_finite(total: Any) -> bool:
    """Whether a total norm is finite (a sync for a CUDA tensor)."""
    return math.isfinite(total) if isinstance(total, numbers.Real) else bool(torch.isfinite(total))


def as_tensor(norms: Norms) -> torch.Tensor:
    """The total norm as torch returns it from ``clip_grad_norm_``: a 0-d tensor of the gradients'
    (promoted) dtype on the first gradient's device."""
    total = norms.total
    if isinstance(total, torch.Tensor):
        return total.to(device=norms.device, dtype=norms.dtype)
    return torch.tensor(total, dtype=norms.dtype).to(norms.device)


def norm_for(total: Any, bucket: Any) -> Any:
    """The total norm as ``bucket``'s plan takes it (``grad_norm=``): a float on the CPU, a 0-d float64
    tensor on the bucket's CUDA device."""
    if bucket.on_cpu:
        return total.item() if isinstance(total, torch.Tensor) else float(total)
    if not isinstance(total, torch.Tensor):
        return torch.tensor(total, dtype=torch.float64, device=bucket.device)
    return total.to(device=bucket.device, dtype=torch.float64)


def found_inf_of(total: Any, device: torch.device) -> torch.Tensor:
    """GradScaler's found_inf of a pre-pass: 1.0 where the 2-norm is NaN/inf, as a float32 0-d
    tensor on ``device`` (the scale's; no sync on CUDA)."""
    if isinstance(total, torch.Tensor):
        return (~torch.isfinite(total)).to(device=device, dtype=torch.float32)
    return torch.full((), 0.0 if math.isfinite(total) else 1.0, dtype=torch.float32, device=device)
