"""The NumPy reference oracle: RAdam written for clarity, in float64, as a pure function.

This is the single source of truth for every backend's tests and the slow baseline of the
benchmarks. It deliberately shares no code with :mod:`fastradam.scalars` (it derives its own
bias corrections, ``rho_t`` and ``r_t`` from the textbook formulas), so a bug in the backends'
folded scalars cannot hide behind the oracle.
"""

from __future__ import annotations

import math

import numpy as np

from fastradam.flavours import FlavourLike, resolve_flavour


def reference_step(
    params: np.ndarray,
    grads: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
    flavour: FlavourLike = "torch",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One RAdam step of ``torch.optim.RAdam``, computed in float64 on copies of the inputs.

    Parameters
    ----------
    params, grads, exp_avg, exp_avg_sq : numpy.ndarray
        Parameters, gradients and the first and second moments before the step
        (any float dtype; upcast to float64, never modified).
    step : int
        The 1-based number of this update.
    lr, betas, eps, weight_decay, decoupled_weight_decay, maximize
        As in ``torch.optim.RAdam``.
    eps_root : float, default 0
        optax's ``eps_root``: added to ``v_hat = v / (1 - beta2^t)`` under the square root.
    flavour : str or Flavour, default "torch"
        The RAdam variant (see :mod:`fastradam.flavours`).

    Returns
    -------
    params, exp_avg, exp_avg_sq : numpy.ndarray
        The new values, float64.

    Notes
    -----
    With :math:`t` the step and :math:`g` the gradient (negated when maximizing), in the
    default ``torch`` flavour::

        g      = g + wd * p                  (L2 weight decay)
        m      = beta1 * m + (1 - beta1) * g
        v      = beta2 * v + (1 - beta2) * g^2
        m_hat  = m / (1 - beta1^t)
        rho_inf = 2 / (1 - beta2) - 1
        rho_t  = rho_inf - 2 t beta2^t / (1 - beta2^t)
        p      = p * (1 - lr * wd)           (decoupled weight decay, on steps that update p)
        if rho_t > 5:
            r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
            l_t = sqrt(1 - beta2^t) / (sqrt(v + eps_root (1 - beta2^t)) + eps)
                (that is, 1 / (sqrt(v_hat + eps_root) + eps / sqrt(1 - beta2^t)))
            p   = p - lr * m_hat * r_t * l_t
        else:
            p   = p - lr * m_hat

    Other flavours change the comparison (``>=``, threshold 4), use
    ``l_t = 1 / (sqrt(v_hat + eps_root) + eps)`` with ``v_hat = v / (1 - beta2^t)``, or leave ``p``
    untouched below the threshold.
    """
    flavour = resolve_flavour(flavour)
    beta1, beta2 = betas
    p = np.array(params, dtype=np.float64)
    g = np.array(grads, dtype=np.float64)
    m = np.array(exp_avg, dtype=np.float64)
    v = np.array(exp_avg_sq, dtype=np.float64)

    if maximize:
        g = -g
    if weight_decay != 0 and not decoupled_weight_decay:
        g = g + weight_decay * p

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**step)

    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / (1 - beta2**step)
    rectify = rho_t >= flavour.threshold if flavour.inclusive else rho_t > flavour.threshold
    if not rectify and flavour.below_threshold == "none":
        return p, m, v
    if weight_decay != 0 and decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    if rectify:
        r_t = math.sqrt(
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        )
        bias_correction2 = 1 - beta2**step
        if flavour.eps_on_v_hat:
            v_hat = v / bias_correction2
            adaptive_lr = 1 / (np.sqrt(v_hat + eps_root) + eps)
        else:  # eps_root goes to v_hat = v / bc2 here too: sqrt(v_hat + eps_root) = sqrt(v + eps_root bc2) / sqrt(bc2)
            adaptive_lr = math.sqrt(bias_correction2) / (np.sqrt(v + eps_root * bias_correction2) + eps)
        p = p - lr * m_hat * r_t * adaptive_lr
    else:
        p = p - lr * m_hat
    return p, m, v


# --- how bfloat16 params keep their values: the oracle's own statement of fastradam.rounding's rules ---

def split_master(master: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 master values as (bfloat16 bits ``uint16``, int16 remainders): the high half,
    rounded up in magnitude when the low half's top bit is set; the low half as the remainder.
    A NaN shows as the quiet NaN with its sign."""
    bits = np.ascontiguousarray(master, dtype=np.float32).view(np.uint32)
    low = (bits & 0xFFFF).astype(np.uint16)
    remainder = low.view(np.int16)
    high = (bits >> 16).astype(np.uint16) + (remainder < 0).astype(np.uint16)
    quiet_nan = ((bits >> 16) & 0x8000 | 0x7FC0).astype(np.uint16)
    return np.where(np.isnan(master), quiet_nan, high), remainder


def join_master(bfloat16_bits: np.ndarray, remainders: np.ndarray) -> np.ndarray:
    """The float32 masters of bfloat16 bits and their int16 remainders (the inverse of :func:`split_master`)."""
    high = bfloat16_bits.astype(np.uint32) - (remainders < 0).astype(np.uint32)
    return ((high << 16) | remainders.view(np.uint16).astype(np.uint32)).astype(np.uint32).view(np.float32)


def _splitmix64(z: int) -> int:
    mask = 2**64 - 1
    z = (z + 0x9E3779B97F4A7C15) % 2**64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
    return z ^ (z >> 31)


def _lowbias32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def stochastic_round_bits(seed: int, step: int, index: np.ndarray) -> np.ndarray:
    """The 16 random bits (``uint32`` in ``[0, 2**16)``) of the elements at global indices
    ``index`` in step ``step`` of a run seeded ``seed``."""
    key = _splitmix64(seed ^ _splitmix64(step))
    index = np.asarray(index, dtype=np.uint64)
    low, high = (index & np.uint64(0xFFFFFFFF)).astype(np.uint32), (index >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        mixed = _lowbias32(_lowbias32(low ^ np.uint32(key & 0xFFFFFFFF)) ^ high ^ np.uint32(key >> 32))
    return mixed >> np.uint32(16)


def stochastic_round_bfloat16(values: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """float32 ``values`` rounded to bfloat16 bits (``uint16``) with the random ``bits``: the
    magnitude up with probability (low half) / 2**16; a NaN becomes the quiet NaN with its sign."""
    words = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((words.astype(np.uint64) + bits) >> np.uint64(16)).astype(np.uint16)
    quiet_nan = ((words >> 16) & 0x8000 | 0x7FC0).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded)


# --- gradient clipping by the global norm: the oracle's own statement of fastradam.clipping's rules ---

def reference_grad_norm(grads: list[np.ndarray], norm_type: float = 2.0, grad_scale: float = 1.0) -> float:
    """``torch.nn.utils.clip_grad_norm_``'s total norm of the unscaled gradients ``g / grad_scale``
    (all of ``grads`` together), in float64: ``(sum |g|^p)^(1/p)``, or ``max |g|`` for inf (NaN
    if any gradient is NaN)."""
    flat = np.concatenate([np.asarray(g, dtype=np.float64).ravel() for g in grads]) / grad_scale
    if flat.size == 0:
        return 0.0
    magnitudes = np.abs(flat)
    if norm_type == math.inf:
        return float(np.max(magnitudes))
    return float(np.sum(magnitudes**norm_type) ** (1.0 / norm_type))


def reference_clip_coefficient(norm: float, max_norm: float) -> float:
    """torch's ``clamp(max_norm / (norm + 1e-6), max=1)``: NaN stays NaN."""
    return float(np.minimum(max_norm / (norm + 1e-6), 1.0))


# --- blockwise 8-bit and 4-bit moments (issue 16): the oracle's own statement of fastradam.quantization's rules ---
# Only the formats (block, bits, the float32 code tables) come from fastradam.quantization; the code
# choice is written here independently of its threshold search: the nearest code by distance.

from typing import NamedTuple  # noqa: E402

from fastradam.quantization import FormatLike, get_format  # noqa: E402


def _float32_at_least(value: float) -> np.float32:
    """The smallest float32 >= ``value`` (NaN stays NaN; beyond float32's range, inf)."""
    with np.errstate(over="ignore"):
        rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return rounded


def quantize_blockwise(values: np.ndarray, format: FormatLike, role: str) -> tuple[np.ndarray, np.ndarray]:
    """One moment of one tensor (``values``, any float dtype, blocks from its start) in a block
    format: ``(codes uint8, scales float32)``.

    Per block of ``format.block`` elements (the last one partial): ``scale`` = the largest
    ``|value|``, rounded up to float32 (NaN if the block holds a NaN); each element gets the code
    ``c`` minimising ``|value - map[c] * scale|``, of the two at an exact tie the one with the larger
    ``|map[c]|``; a block whose scale is 0, inf or NaN gets the code nearest 0 throughout. 4-bit
    codes are packed two per byte, the even element in the high nibble, a 0 nibble after an odd
    last element.
    """
    fmt = get_format(format)
    table = np.asarray(fmt.code_map(role).values, dtype=np.float64)
    magnitudes = np.abs(table)
    x = np.asarray(values, dtype=np.float64).ravel()
    n, block = x.size, fmt.block
    n_blocks = -(-n // block)
    codes = np.empty(n, dtype=np.uint8)
    scales = np.empty(n_blocks, dtype=np.float32)
    for b in range(n_blocks):
        part = slice(b * block, min(n, (b + 1) * block))
        absmax = np.max(np.abs(x[part]))  # NaN if the block holds one
        scale = _float32_at_least(absmax)
        scales[b] = scale
        if not 0 < scale < np.inf:
            codes[part] = np.argmin(magnitudes)
            continue
        distance = np.abs(x[part, None] - table[None, :] * float(scale))  # the products are exact
        nearest = distance == distance.min(axis=1, keepdims=True)
        codes[part] = np.argmax(np.where(nearest, magnitudes, -1.0), axis=1)
    if fmt.codes_per_byte == 2:
        padded = np.zeros(2 * (-(-n // 2)), dtype=np.uint8)
        padded[:n] = codes
        codes = (padded[0::2] << 4) | padded[1::2]
    return codes.astype(np.uint8), scales


def dequantize_blockwise(codes: np.ndarray, scales: np.ndarray, format: FormatLike, role: str,
                         n: int | None = None) -> np.ndarray:
    """The float64 values ``map[code] * scale`` of ``n`` elements (default: every code) stored as
    ``codes`` and ``scales`` in a block format (exact: both factors are float32)."""
    fmt = get_format(format)
    table = np.asarray(fmt.code_map(role).values, dtype=np.float64)
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    if fmt.codes_per_byte == 2:
        codes = np.stack([codes >> 4, codes & 0x0F], axis=1).ravel()
    n = codes.size if n is None else int(n)
    per_element = np.repeat(np.asarray(scales, dtype=np.float64), fmt.block)[:n]
    return table[codes[:n]] * per_element


class QuantizedStep(NamedTuple):
    """The result of :func:`reference_step_quantized`: the new float64 params, both moments'
    codes and scales, and the float64 moments before they were requantised."""

    params: np.ndarray
    exp_avg_codes: np.ndarray
    exp_avg_scales: np.ndarray
    exp_avg_sq_codes: np.ndarray
    exp_avg_sq_scales: np.ndarray
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray


def reference_step_quantized(
    params: np.ndarray,
    grads: np.ndarray,
    exp_avg_codes: np.ndarray,
    exp_avg_scales: np.ndarray,
    exp_avg_sq_codes: np.ndarray,
    exp_avg_sq_scales: np.ndarray,
    *,
    format: FormatLike,
    step: int,
    **options,
) -> QuantizedStep:
    """One RAdam step of a tensor whose moments are stored in a block format, in float64.

    Per block, in order: dequantise the block's m and v (:func:`dequantize_blockwise`), do the
    step (:func:`reference_step` with ``step`` and ``options``), take the new absmax of m and of v
    over the block, requantise both (:func:`quantize_blockwise`). Every stage but the absmax is
    element-wise, so the whole tensor is done stage by stage here. v (and m) are updated and
    requantised on every step, below the rectification threshold too, whatever the flavour does
    with the params there.
    """
    fmt = get_format(format)
    n = np.asarray(params).size
    m = dequantize_blockwise(exp_avg_codes, exp_avg_scales, fmt, "exp_avg", n)
    v = dequantize_blockwise(exp_avg_sq_codes, exp_avg_sq_scales, fmt, "exp_avg_sq", n)
    p, m, v = reference_step(np.asarray(params).ravel(), np.asarray(grads).ravel(), m, v, step=step, **options)
    m_codes, m_scales = quantize_blockwise(m, fmt, "exp_avg")
    v_codes, v_scales = quantize_blockwise(v, fmt, "exp_avg_sq")
    return QuantizedStep(p, m_codes, m_scales, v_codes, v_scales, m, v)
