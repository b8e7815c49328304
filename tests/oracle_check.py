"""Compare a backend's step with the float64 oracle under a stated, per-dtype rounding bound.

The tolerance
-------------
A backend computes in its math dtype with unit roundoff ``u`` (2^-53 when everything is
float64, else 2^-24: float32 math, also for 16-bit storage); the oracle computes in float64
from the same inputs. Each elementary operation adds
at most ``u`` times the magnitude of its own result, so to first order an output's error is
bounded by ``k * u * S``, where ``S`` is the output's formula evaluated with every term
replaced by its absolute value (the "error scale") and ``k`` the longest chain of roundings
(scalar casts included): about 12 for the parameter update; we allow ``ROUNDINGS = 16``.
Results that underflow get an absolute floor of ``ROUNDINGS`` smallest subnormals. An output
stored in 16 bits is rounded once more, to nearest: the float32 result and the oracle's may
round to neighbouring values, so the bound adds one unit in the last place (ULP) of the
storage format at the oracle's value.

A backend off by one wrong constant, a wrong branch or a float32 ``1 - beta2`` computed in
float32 (a 1e-5 relative error) lands far outside this bound; see ``test_oracle_check.py``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fastradam.reference import reference_step

ROUNDINGS = 16
FLOAT32_ROUNDOFF = 2.0**-24
FLOAT64_ROUNDOFF = 2.0**-53
_PROBE = 2.0**-100  # a momentum too small to matter, exact to scale by


def _f64(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float64).reshape(-1)


def error_scales(before: Sequence[Any], hyper: Mapping[str, Any]) -> tuple[np.ndarray, ...]:
    """Absolute-value scales ``(S_p, S_m, S_v)`` of one step from ``before = (p, g, m, v)``."""
    p, g, m, v = (np.abs(_f64(x)) for x in before)
    lr = hyper.get("lr", 1e-3)
    weight_decay = hyper.get("weight_decay", 0.0)
    decoupled = hyper.get("decoupled_weight_decay", False)
    g_abs = g + (0.0 if decoupled else weight_decay) * p
    scale_m = m + g_abs
    scale_v = v + g_abs * g_abs
    # The oracle's own step multiplier (lr * r_t * sqrt(bc2) / bc1 / (sqrt(v' + eps_root bc2) + eps), or
    # lr / bc1 below the threshold) read off a probe step whose momentum is _PROBE exactly
    # and whose v' = beta2 * v <= the real v' (so the multiplier is never underestimated).
    probe = np.full_like(p, _PROBE)
    kwargs = {k: hyper[k] for k in ("step", "lr", "betas", "eps", "eps_root", "flavour") if k in hyper}
    probe_p, _, _ = reference_step(np.zeros_like(p), probe, probe, v, **kwargs)
    multiplier = np.abs(probe_p) / _PROBE
    decay = max(1.0, abs(1.0 - lr * weight_decay)) if decoupled else 1.0
    scale_p = p * decay + multiplier * scale_m
    return scale_p, scale_m, scale_v


#: (mantissa bits, smallest normal exponent) of the 16-bit storage formats.
_FORMATS = {"bfloat16": (7, -126), "float16": (10, -14)}


def storage_ulp(values: np.ndarray, dtype: Any) -> np.ndarray:
    """One unit in the last place of ``dtype`` (a 16-bit float) at each of ``values``: the gap
    above ``|value|`` in its binade, the subnormal spacing near zero, never infinite."""
    mantissa, min_exponent = _FORMATS[np.dtype(dtype).name]
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    with np.errstate(divide="ignore"):
        exponent = np.maximum(np.floor(np.log2(magnitude)), min_exponent)
    return np.exp2(exponent - mantissa)


def assert_matches_oracle(
    before: Sequence[Any], after: Sequence[Any], hyper: Mapping[str, Any]
) -> None:
    """Assert ``after = (p, m, v)`` equals the oracle's step from ``before = (p, g, m, v)``.

    ``hyper`` holds ``fused_step``'s keyword arguments (``step`` included; any
    ``grad_scale`` must already be applied to ``before``'s gradient). The bound is
    ``|after - oracle| <= ROUNDINGS * (u * S + smallest_subnormal)`` element-wise, plus one
    storage ULP for outputs stored in 16 bits.
    """
    dtypes = [np.asarray(x).dtype for x in (*before, *after)]
    all_float64 = all(d == np.float64 for d in dtypes)
    u = FLOAT64_ROUNDOFF if all_float64 else FLOAT32_ROUNDOFF
    floor = float(np.finfo(np.float64 if all_float64 else np.float32).smallest_subnormal)
    kwargs = {k: v for k, v in hyper.items() if k not in ("grad_scale", "check_finite")}
    expected = reference_step(*(np.asarray(x) for x in before), **kwargs)
    for name, got, want, scale in zip(("params", "exp_avg", "exp_avg_sq"), after, expected,
                                      error_scales(before, kwargs)):
        storage = np.asarray(got).dtype
        got = _f64(got)
        want = want.reshape(-1)
        bound = ROUNDINGS * (u * scale + floor)
        if storage.itemsize == 2:
            bound = bound + storage_ulp(want, storage)
        error = np.abs(got - want)
        bad = ~(error <= bound)  # NaN counts as a mismatch
        if np.any(bad):
            i = int(np.argmax(bad))
            raise AssertionError(
                f"{name} ({storage}) differs from the oracle at {int(bad.sum())} of {bad.size} "
                f"elements; first at [{i}]: got {got[i]!r}, oracle {want[i]!r}, "
                f"error {error[i]:.3g} > bound {bound[i]:.3g} (hyper={dict(hyper)})"
            )
