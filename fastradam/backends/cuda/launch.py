"""The kernels' argument lists, built in one place: what every CUDA launch passes.

The CPU harness of the CUDA kernels (``tests/cuda_harness.py``) builds its arguments with these
same functions and hands them to the kernels built by g++ the way ``cuLaunchKernel`` reads its
``kernelParams`` (each parameter's bytes, of the kernel's declared type), so the launch ABI is
checked on every run without a GPU. Nothing here touches a device.

Buffers and tables are passed as given (CuPy arrays on the GPU, NumPy arrays in the harness: both
are pointer parameters); a missing one (no master, no flag) as a null address; scalars as NumPy
scalars of exactly the parameter's type (CuPy would pass a Python float as a double unchecked);
the records of :mod:`fastradam.spec` (``ElementScalars<M>``, ``GroupRow``) as NumPy structured
scalars, which CuPy passes by value as the C structs they lay out.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from fastradam.clipping import Clip
from fastradam.options import GroupOptions
from fastradam.spec import DTYPE_CODES, GROUP_FLOATS, GROUP_INTS, GROUP_ROW, SCALARS, VALUE_CODES, record_dtype

#: A pair ``(address or array, value code)`` for a kernel's ``const void*, int`` value parameters.
Value = tuple[Any, np.int32]

#: The skip flag of a launch that nothing skips.
NO_FLAG: Value = (np.uint64(0), np.int32(VALUE_CODES["no_value"]))
#: The record type of the capturable kernels' ``GroupRow``.
GROUP_DTYPE = record_dtype(GROUP_ROW, np.dtype(np.float64))


def null_or(array: Any) -> Any:
    """A pointer argument: the array, or a null address for None."""
    return np.uint64(0) if array is None else array


@functools.lru_cache(maxsize=None)
def scalars_dtype(math_dtype: np.dtype) -> np.dtype:
    """The record type of ``ElementScalars<M>`` for the math dtype."""
    return record_dtype(SCALARS, np.dtype(math_dtype))


def scalars_record(floats: np.ndarray, ints: np.ndarray, row: int = 0) -> np.void:
    """Row ``row`` of the host scalar tables (``scalars.pack_rows``) as an ``ElementScalars<M>`` record."""
    return np.array((*floats[row].tolist(), *ints[row].tolist()), dtype=scalars_dtype(floats.dtype))[()]


def group_values(group: GroupOptions, lr: float | tuple[int, int], grad_scale: float) -> tuple[dict[str, Any], int]:
    """A group's ``GroupRow`` fields by name, and its lr's address: ``lr`` is a real number, or the
    ``(address, value code)`` of a 0-d float32/float64 device value the kernel reads (address 0: none)."""
    address, code = (0, VALUE_CODES["no_value"]) if not isinstance(lr, tuple) else lr
    flavour = group.flavour
    values = {"lr": 0.0 if isinstance(lr, tuple) else float(lr), "beta1": group.beta1, "beta2": group.beta2,
              "eps": group.eps, "eps_root": group.eps_root, "weight_decay": group.weight_decay,
              "threshold": float(flavour.threshold), "inv_grad_scale": 1.0 / grad_scale,
              "decoupled": int(group.decoupled_weight_decay), "maximize": int(group.maximize),
              "inclusive": int(flavour.inclusive), "hold_below": int(flavour.below_threshold == "none"),
              "eps_on_v_hat": int(flavour.eps_on_v_hat), "lr_code": int(code)}
    return values, address


def group_record(group: GroupOptions, lr: float | tuple[int, int], grad_scale: float) -> tuple[np.void, int]:
    """A group as the flat capturable kernel's ``GroupRow`` record, and its lr's address (0: none)."""
    values, address = group_values(group, lr, grad_scale)
    return np.array(tuple(values[f.name] for f in GROUP_ROW), dtype=GROUP_DTYPE)[()], address


def group_tables(groups: Sequence[GroupOptions], lrs: Sequence[float | tuple[int, int]],
                 grad_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The group tables of the capturable segments kernel, one row per group: reals (R, kGroupFloats)
    float64 and ints (R, kGroupInts) int32, columns as :data:`fastradam.spec.GROUP_ROW`, and each
    group's lr address (R,) uint64 (0 for a real lr)."""
    rows = [group_values(group, lr, grad_scale) for group, lr in zip(groups, lrs)]
    floats = np.array([[values[n] for n in GROUP_FLOATS] for values, _ in rows], dtype=np.float64)
    ints = np.array([[values[n] for n in GROUP_INTS] for values, _ in rows], dtype=np.int32)
    pointers = np.array([address for _, address in rows], dtype=np.uint64)
    return floats.reshape(-1, len(GROUP_FLOATS)), ints.reshape(-1, len(GROUP_INTS)), pointers


def step(buffers: Sequence[Any], master: Any, n: int, scalars: np.void, skip: Value, factor: Any = None) -> tuple:
    """``radam_step(p, g, m, v, side, n, ElementScalars<M> s, factor, skip, skip_code)``; ``master`` (the
    side buffer) is the fp32 master or the int16 remainders, or None; ``factor`` the clipped step's
    device gradient factor (the norm pre-pass's), or None (the scalars' inv_grad_scale)."""
    return (*buffers, null_or(master), np.int64(n), scalars, null_or(factor), *skip)


def segments(buffers: Sequence[Any], master: Any, tiles: Any, n_tiles: int, rows: Any, floats: Any, ints: Any,
             shifts: Any, skip: Value, factor: Any = None) -> tuple:
    """``radam_step_segments(p, g, m, v, side, tiles, n_tiles, segment_row, floats, ints, shifts, factor,
    skip, skip_code)``; ``shifts`` (:func:`~fastradam.backends.cuda.tables.index_shifts`) only with
    stochastic rounding, else None; ``factor`` as for :func:`step`."""
    return (*buffers, null_or(master), tiles, np.int64(n_tiles), rows, floats, ints, null_or(shifts),
            null_or(factor), *skip)


def tensors(pointers: Any, tiles: Any, n_tiles: int, rows: Any, floats: Any, ints: Any, shifts: Any,
            skip: Value, factor: Any = None) -> tuple:
    """``radam_step_tensors(pointers, tiles, n_tiles, tensor_row, floats, ints, shifts, factor, skip,
    skip_code)``; ``shifts`` as for :func:`segments`, ``factor`` as for :func:`step`."""
    return (pointers, tiles, np.int64(n_tiles), rows, floats, ints, null_or(shifts), null_or(factor), *skip)


def capturable(buffers: Sequence[Any], master: Any, n: int, step_count: Value, lr_address: Any, group: np.void,
               skip: Value, factor: Any = None) -> tuple:
    """``radam_step_capturable(p, g, m, v, side, n, step, step_code, lr, GroupRow group, factor, skip,
    skip_code)``; ``factor`` as for :func:`step` (in place of the group's inv_grad_scale)."""
    return (*buffers, null_or(master), np.int64(n), *step_count, np.uint64(lr_address) if isinstance(
        lr_address, int) else lr_address, group, null_or(factor), *skip)


def segments_capturable(buffers: Sequence[Any], master: Any, tiles: Any, n_tiles: int, segment_group: Any,
                        steps: Value, group_floats: Any, group_ints: Any, lr_pointers: Any, skip: Value,
                        factor: Any = None) -> tuple:
    """``radam_step_segments_capturable(p, g, m, v, side, tiles, n_tiles, segment_group, steps, step_code,
    group_floats, group_ints, lr_pointers, factor, skip, skip_code)``; ``factor`` as for :func:`capturable`."""
    return (*buffers, null_or(master), tiles, np.int64(n_tiles), segment_group, *steps, group_floats, group_ints,
            lr_pointers, null_or(factor), *skip)


# --- The gradient pre-pass: check_finite, or the clipping norm ------------------------------------


def norm_request(clip: Clip | None = None, *, partials: Any = None, counters: Any = None, given: Value = NO_FLAG,
                 norm: Any = None, factor: Any = None, check_finite: bool = False) -> tuple:
    """The pre-pass's norm arguments ``partials, counters, given, given_code, norm, factor, code, power,
    inv_grad_scale, max_norm, check_finite`` (``NormRequest`` in radam.cu).

    Without ``clip``: the finite check (every pointer null). With it: the norm of ``clip`` into the
    0-d float64 ``norm``, from the gradients (``partials``: the float64 scratch, ``counters``: the
    uint32 arrival counters, zero) or from ``given`` (``(norm array, value code)``: no gradient read),
    and, unless ``clip.max_norm`` is None (the norm alone), the gradient factor into the 0-d float64
    ``factor``; ``check_finite``: a NaN/inf norm sets the update's flag."""
    if clip is None:
        return (*(np.uint64(0),) * 2, *NO_FLAG, *(np.uint64(0),) * 2, np.int32(0), np.float64(0.0),
                np.float64(1.0), np.float64(0.0), np.int32(0))
    max_norm = 0.0 if clip.max_norm is None else clip.max_norm
    return (null_or(partials), null_or(counters), *given, norm, null_or(None if clip.max_norm is None else factor),
            np.int32(clip.code), np.float64(clip.norm_type), np.float64(clip.inv_grad_scale),
            np.float64(max_norm), np.int32(bool(check_finite)))


#: The norm arguments of the finite check alone.
FINITE_CHECK = norm_request()


def given_norm(norm: Any) -> Value:
    """``given, given_code`` of a given 0-d device norm (float32 or float64)."""
    return norm, np.int32(DTYPE_CODES[norm.dtype])


def prepass_flat(grads: Any, n: int, skip: Value, flag: Any, norm: tuple = FINITE_CHECK) -> tuple:
    """``prepass_flat(g, n, found_inf, found_inf_code, flag, <norm arguments>)`` (:func:`norm_request`)."""
    return (null_or(grads), np.int64(n), *skip, null_or(flag), *norm)


def prepass_segments(grads: Any, tiles: Any, n_tiles: int, rows: Any, skip: Value, flag: Any,
                     norm: tuple = FINITE_CHECK) -> tuple:
    """``prepass_segments(g, tiles, n_tiles, segment_row, found_inf, found_inf_code, flag, <norm arguments>)``."""
    return (grads, tiles, np.int64(n_tiles), rows, *skip, null_or(flag), *norm)


def prepass_tensors(pointers: Any, columns: int, tiles: Any, n_tiles: int, rows: Any, skip: Value, flag: Any,
                    norm: tuple = FINITE_CHECK) -> tuple:
    """``prepass_tensors(pointers, columns, tiles, n_tiles, tensor_row, found_inf, found_inf_code, flag,
    <norm arguments>)``."""
    return (pointers, np.int64(columns), tiles, np.int64(n_tiles), rows, *skip, null_or(flag), *norm)

