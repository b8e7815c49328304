"""RAdam flavours: how each major implementation decides and scales its step.

The implementations in the wild agree on the moments and on ``r_t`` but differ in four
places; a :class:`Flavour` names one choice for each, and :data:`PRESETS` reproduces the
peers (``torch`` is the default everywhere):

============  ===========  ====================  ======================  =================
preset        rectify when below the threshold   eps                     decoupled decay
============  ===========  ====================  ======================  =================
torch         rho_t > 5    p -= lr m_hat         sqrt(bc2)/(sqrt(v)+eps)  every step
authors       rho_t >= 5   no update, no decay   sqrt(bc2)/(sqrt(v)+eps)  updating steps
optax         rho_t >= 5   p -= lr m_hat         1/(sqrt(v_hat)+eps)      (no decay)
keras / tfa   rho_t >= 5   p -= lr m_hat         1/(sqrt(v_hat)+eps)      every step
timm_legacy   rho_t >= 5   p -= lr m_hat         sqrt(bc2)/(sqrt(v)+eps)  every step
fastai        rho_t > 5    p -= lr m_hat         1/(sqrt(v_hat)+eps)      every step
paper         rho_t > 4    p -= lr m_hat         sqrt(bc2)/(sqrt(v)+eps)  every step
============  ===========  ====================  ======================  =================

Weight decay itself is chosen per group with ``weight_decay`` and ``decoupled_weight_decay``:
L2 adds ``wd * p`` to the gradient; decoupled multiplies ``p`` by ``1 - lr * wd`` on every step
that updates ``p``. keras/TFA add ``wd * p`` to the update before the ``lr`` multiply, which is
the same product ``p - lr (u + wd p) = (1 - lr wd) p - lr u``; the authors skip it on the
steps where they skip the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

BelowThreshold = Literal["momentum", "none"]


@dataclass(frozen=True)
class Flavour:
    """One RAdam variant.

    Parameters
    ----------
    name : str
        A label for messages and reports.
    threshold : float, default 5
        The SMA length above which the adaptive step is rectified; at least 4 (below that
        ``r_t`` is not real), and above 4 when ``inclusive``.
    inclusive : bool, default False
        Rectify when ``rho_t >= threshold`` (True) or ``rho_t > threshold`` (False).
    below_threshold : {"momentum", "none"}, default "momentum"
        Below the threshold take the bias-corrected momentum step ``p -= lr * m_hat``, or
        leave the parameters (and their decoupled decay) alone while the moments still update.
    eps_on_v_hat : bool, default False
        Divide by ``sqrt(v_hat) + eps`` (optax, keras, TFA, fastai) instead of torch's
        ``(sqrt(v) + eps) / sqrt(1 - beta2^t)``.
    """

    name: str
    threshold: float = 5.0
    inclusive: bool = False
    below_threshold: BelowThreshold = "momentum"
    eps_on_v_hat: bool = False

    def __post_init__(self) -> None:
        if not self.threshold >= 4.0:
            raise ValueError(f"flavour threshold must be >= 4 (r_t is not real below 4), got {self.threshold!r}")
        if self.inclusive and self.threshold == 4.0:
            raise ValueError("an inclusive flavour needs a threshold > 4: at rho_t = rho_inf = 4 (beta2 = 0.6) "
                             "r_t is 0/0")
        if self.below_threshold not in ("momentum", "none"):
            raise ValueError(f"flavour below_threshold must be 'momentum' or 'none', got {self.below_threshold!r}")

    def rectifies(self, rho_t: float) -> bool:
        """Whether a step with SMA length ``rho_t`` takes the rectified adaptive step."""
        return rho_t >= self.threshold if self.inclusive else rho_t > self.threshold


PRESETS: dict[str, Flavour] = {
    "torch": Flavour("torch"),
    "authors": Flavour("authors", inclusive=True, below_threshold="none"),
    "optax": Flavour("optax", inclusive=True, eps_on_v_hat=True),
    "keras": Flavour("keras", inclusive=True, eps_on_v_hat=True),
    "tfa": Flavour("tfa", inclusive=True, eps_on_v_hat=True),
    "timm_legacy": Flavour("timm_legacy", inclusive=True),
    "fastai": Flavour("fastai", eps_on_v_hat=True),
    "paper": Flavour("paper", threshold=4.0),
}

FlavourLike = Union[str, Flavour]


def resolve_flavour(flavour: FlavourLike) -> Flavour:
    """A :class:`Flavour` from a preset name or a Flavour; TypeError/ValueError otherwise."""
    if isinstance(flavour, Flavour):
        return flavour
    if isinstance(flavour, str):
        try:
            return PRESETS[flavour]
        except KeyError:
            raise ValueError(f"flavour must be one of {sorted(PRESETS)} or a Flavour, got {flavour!r}") from None
    raise TypeError(f"flavour must be a preset name or a Flavour, got {type(flavour).__name__}")
