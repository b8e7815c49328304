"""Learning-rate schedules computed on the host per step: keras-radam / TFA warmup and decay."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KerasWarmup:
    """keras-radam / TFA ``RectifiedAdam``'s schedule: linear warmup, then linear decay.

    With ``warmup = total_steps * warmup_proportion`` (not rounded, as keras-radam) and
    ``decay = max(total_steps - warmup, 1)``, the learning rate of step ``t`` (1-based) is::

        lr * t / warmup                                         if t <= warmup
        lr + (min_lr - lr) * min(t - warmup, decay) / decay     otherwise

    As in keras-radam, this learning rate also scales the decoupled weight decay.

    Parameters
    ----------
    total_steps : int
        Steps of the whole schedule (> 0).
    warmup_proportion : float, default 0.1
        Share of ``total_steps`` spent warming up, in [0, 1].
    min_lr : float, default 0
        The learning rate reached at ``total_steps``.
    """

    total_steps: int
    warmup_proportion: float = 0.1
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {self.total_steps!r}")
        if not 0.0 <= self.warmup_proportion <= 1.0:
            raise ValueError(f"warmup_proportion must be in [0, 1], got {self.warmup_proportion!r}")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0.0):
            raise ValueError(f"min_lr must be finite and >= 0, got {self.min_lr!r}")

    def lr_at(self, step: int, lr: float) -> float:
        """The learning rate of step ``step`` (1-based) for a base learning rate ``lr``."""
        warmup = self.total_steps * self.warmup_proportion
        decay = max(self.total_steps - warmup, 1)
        if step <= warmup:
            return lr * step / warmup
        return lr + (self.min_lr - lr) * min(step - warmup, decay) / decay
