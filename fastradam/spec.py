"""The step's kernel ABI, declared once: scalar fields, group-row fields, update modes, value codes.

Python builds its tables from these declarations (:mod:`fastradam.scalars`), the Numba
kernels read their fields by these names, and the CUDA side reads them through
``kernels/generated/abi.cuh``, written from here by ``python -m fastradam.abi_header`` (a test
fails when the checked-in header is stale). Adding a field is one line here, then the math
that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np



@dataclass(frozen=True)
class Field:
    """One field of a kernel record: its name, kind (``"real"``: the math type, ``"double"``,
    ``"int"``) and meaning."""

    name: str
    kind: str
    doc: str


#: The folded per-step scalars of the element update (``scalars.StepScalars`` plus the
#: gradient's unscale factor), in the order of the kernels' record ``ElementScalars<M>``.
SCALARS: tuple[Field, ...] = (
    Field("one_minus_beta1", "real", "1 - beta1"),
    Field("beta2", "real", "beta2"),
    Field("one_minus_beta2", "real", "1 - beta2"),
    Field("eps", "real", "pre-scaled by sqrt(bc2) in flavours that add eps to sqrt(v_hat)"),
    Field("eps_root", "real", "added to v under the square root: eps_root * bc2 (0: no add)"),
    Field("l2_weight_decay", "real", "0 when the weight decay is decoupled"),
    Field("param_decay", "real", "1 - lr*wd when decoupled and p updates, else exactly 1"),
    Field("step_size", "real", "lr*r_t*sqrt(bc2)/bc1 (RECTIFIED), lr/bc1 (MOMENTUM), 0 (HOLD)"),
    Field("inv_grad_scale", "real", "1 / grad_scale: the gradient's unscale factor"),
    Field("negate_grad", "int", "maximize: the gradient is negated"),
    Field("mode", "int", "kMomentum, kRectified or kHold"),
    Field("round_key_lo", "int", "stochastic rounding: low 32 bits of the step's key (bit pattern; 0 when off)"),
    Field("round_key_hi", "int", "stochastic rounding: high 32 bits of the step's key (bit pattern; 0 when off)"),
)
SCALAR_FLOATS = tuple(f.name for f in SCALARS if f.kind == "real")
SCALAR_INTS = tuple(f.name for f in SCALARS if f.kind == "int")
#: Position of each field in the Numba kernels' scalars tuple (the floats, then the ints).
SCALAR_INDEX = {name: i for i, name in enumerate(SCALAR_FLOATS + SCALAR_INTS)}

#: One parameter group's row for the capturable kernels, which fold the scalars themselves
#: on the device from the step count they read there (``GroupRow`` in the generated header).
GROUP_ROW: tuple[Field, ...] = (
    Field("lr", "double", "the learning rate when lr_code is kNoValue"),
    Field("beta1", "double", "beta1"),
    Field("beta2", "double", "beta2"),
    Field("eps", "double", "eps"),
    Field("eps_root", "double", "eps_root"),
    Field("weight_decay", "double", "weight decay"),
    Field("threshold", "double", "the flavour's rectification threshold"),
    Field("inv_grad_scale", "double", "1 / grad_scale"),
    Field("decoupled", "int", "decoupled weight decay"),
    Field("maximize", "int", "negate the gradient"),
    Field("inclusive", "int", "rectify when rho_t >= threshold (else >)"),
    Field("hold_below", "int", "below the threshold p is left alone (else momentum)"),
    Field("eps_on_v_hat", "int", "eps is added to sqrt(v_hat)"),
    Field("lr_code", "int", "value code of a device lr (kNoValue: the lr field)"),
)
GROUP_FLOATS = tuple(f.name for f in GROUP_ROW if f.kind == "double")
GROUP_INTS = tuple(f.name for f in GROUP_ROW if f.kind == "int")

#: The three element updates, chosen per step (and per segment) on the host.
MODES = {"momentum": 0, "rectified": 1, "hold": 2}

#: The norm pre-pass's cases of ``norm_type`` (:mod:`fastradam.clipping`): 2, 1, inf, any other p > 0.
NORM_CODES = {"two": 0, "one": 1, "inf": 2, "power": 3}
#: torch's ``clip_grad_norm_`` adds this to the norm before dividing (``kNormEps`` in the header).
NORM_EPS = 1e-6

#: Type codes of the 0-d (or 1-D) device values the kernels read: a step count, an lr, a flag.
VALUE_CODES = {"no_value": 0, "int8": 1, "int32": 2, "int64": 3, "float32": 4, "float64": 5}
#: The value code of each NumPy dtype a device value may have (one byte types read as int8).
DTYPE_CODES: dict[np.dtype, int] = {
    np.dtype(np.bool_): 1, np.dtype(np.int8): 1, np.dtype(np.uint8): 1,
    np.dtype(np.int32): 2, np.dtype(np.uint32): 2, np.dtype(np.int64): 3, np.dtype(np.uint64): 3,
    np.dtype(np.float32): 4, np.dtype(np.float64): 5,
}

_NUMPY_TYPES = {"double": np.float64, "int": np.int32}


def record_dtype(fields: tuple[Field, ...], real: np.dtype) -> np.dtype:
    """The NumPy structured dtype laid out as the C struct of ``fields`` (``real`` fields in ``real``):
    its scalars are passed to CUDA kernels by value (CuPy's custom user structures)."""
    return np.dtype([(f.name, real if f.kind == "real" else _NUMPY_TYPES[f.kind]) for f in fields], align=True)
