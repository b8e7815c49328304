"""The peers, set up on the same data: torch.optim.RAdam (foreach, loop), torch Adam (fused)."""

from __future__ import annotations

from typing import Callable

import numpy as np

#: Steps taken before timing, so every RAdam is past the threshold (rectified, the costly path).
STEADY_STEP = 10


def torch_optimizer_step(kind: str, buffers: tuple[np.ndarray, ...]) -> Callable[[], None]:
    """Return a zero-argument step of torch optimizer ``kind`` on one flat copy of ``buffers``.

    ``kind`` is ``radam_foreach``, ``radam_loop`` or ``adam_fused``. Moments start from the
    given buffers and the step counter at :data:`STEADY_STEP`.
    """
    import torch

    params, grads, exp_avg, exp_avg_sq = (torch.from_numpy(b.copy()) for b in buffers)
    param = torch.nn.Parameter(params)
    param.grad = grads
    if kind == "adam_fused":
        optimizer = torch.optim.Adam([param], lr=1e-3, fused=True)
    else:
        optimizer = torch.optim.RAdam([param], lr=1e-3, foreach=kind == "radam_foreach")
    optimizer.step()  # creates the state
    state = optimizer.state[param]
    state["exp_avg"].copy_(exp_avg)
    state["exp_avg_sq"].copy_(exp_avg_sq)
    state["step"].fill_(STEADY_STEP)
    return optimizer.step
