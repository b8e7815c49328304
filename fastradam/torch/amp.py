"""``fastradam.torch.GradScaler``: ``torch.amp.GradScaler`` whose ``unscale_`` writes no gradient.

torch's ``unscale_`` multiplies every gradient by ``1 / scale`` in place
(``torch._amp_foreach_non_finite_check_and_unscale_``: a read and a write of each), and an
optimizer cannot intercept it. This subclass, given a :class:`fastradam.torch.RAdam`, instead runs
the clipping pre-pass once (the 2-norm of ``grad / scale``, read-only: a NaN/inf norm is its
found_inf) and records the scale on the optimizer; ``optimizer.clip_grad_norm_(max_norm)`` (2-norm)
reuses that norm, and ``scaler.step(optimizer)`` steps with the scale divided out inside the step's
own pass. So ``unscale_`` + ``clip_grad_norm_`` + ``step`` read the gradients twice and never write
them. Any other optimizer gets torch's ``unscale_``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from fastradam.torch import RAdam

__all__ = ["GradScaler"]


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` (same constructor, ``scale``/``step``/``update``/``state_dict``) whose
    ``unscale_`` of a :class:`fastradam.torch.RAdam` writes nothing.

    * ``unscale_(optimizer)``: the optimizer's gradients are read once (the 2-norm of the
      unscaled gradients, across ranks for DTensor parameters); its finiteness fills
      ``found_inf`` for :meth:`step` and :meth:`update` (backoff as torch's). The scale is
      recorded on the optimizer, which divides it out inside its next step; a following
      ``optimizer.clip_grad_norm_(max_norm)`` (2-norm) reuses the norm, other norms run their
      own pre-pass of the unscaled gradients. The gradients keep their scaled values: read
      ``optimizer.clip_grad_norm_``'s result, not ``p.grad``, for the unscaled norm.
    * ``step(optimizer)`` without ``unscale_`` first: the same pre-pass (instead of torch's found_inf
      check, which writes), then the step. A found_inf skips the step (nothing written).
    * The scale is read on the host when recorded (``float(scale)``: a sync on CUDA).

    Other optimizers: torch's behaviour throughout.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fastradam_unscaled: weakref.WeakSet = weakref.WeakSet()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """torch's ``unscale_``; for a :class:`fastradam.torch.RAdam` the read-only pre-pass and a
        recorded scale instead (see the class)."""
        if not self._enabled or not isinstance(optimizer, RAdam):
            return super().unscale_(optimizer)
        self._check_scale_growth_tracker("unscale_")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if optimizer_state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        scale = float(self._scale.double())  # (a sync on CUDA)
        found_inf = optimizer._unscale(scale, self._scale.device)
        optimizer_state["found_inf_per_device"] = {found_inf.device: found_inf}
        optimizer_state["stage"] = OptState.UNSCALED
        self._fastradam_unscaled.add(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """torch's ``step``; a :class:`fastradam.torch.RAdam` not yet unscaled is first :meth:`unscale_`\\ d
        (the read-only pre-pass is its found_inf check)."""
        if (self._enabled and isinstance(optimizer, RAdam) and "closure" not in kwargs
                and self._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY):
            self.unscale_(optimizer)
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """torch's ``update``; optimizers unscaled since the last one drop a scale they did not step with."""
        super().update(new_scale)
        for optimizer in list(self._fastradam_unscaled):
            optimizer._unscaled = None
        self._fastradam_unscaled = weakref.WeakSet()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_fastradam_unscaled", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fastradam_unscaled = weakref.WeakSet()
