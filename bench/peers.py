"""The peers, set up on the same data: torch.optim.RAdam (foreach, loop), torch Adam (fused)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from fastradam.bench.results import PEERS

#: Steps taken before timing, so every RAdam is past the threshold (rectified, the costly path).
STEADY_STEP = 10


def torch_optimizer_step(kind: str, tensors: Sequence[Sequence[Any]],
                         to_tensor: Callable[[Any], Any] | None = None) -> Callable[[], None]:
    """Return a zero-argument step of torch optimizer ``kind`` on copies of ``tensors``.

    ``kind`` is one of :data:`PEERS` (ValueError otherwise); ``tensors`` holds one
    ``(params, grads, exp_avg, exp_avg_sq)`` quadruple per parameter tensor, converted with
    ``to_tensor`` (default ``torch.from_numpy``; ``torch.from_dlpack`` for CuPy arrays).
    Moments start from the given values and the step counter at :data:`STEADY_STEP`.
    """
    import torch

    if kind not in PEERS:
        raise ValueError(f"unknown peer {kind!r}; peers are {PEERS}")
    to_tensor = to_tensor or torch.from_numpy
    parameters = []
    for params, grads, _, _ in tensors:
        parameter = torch.nn.Parameter(to_tensor(params.copy()))
        parameter.grad = to_tensor(grads.copy())
        parameters.append(parameter)
    if kind == "torch_adam_fused":
        optimizer = torch.optim.Adam(parameters, lr=1e-3, fused=True)
    else:
        optimizer = torch.optim.RAdam(parameters, lr=1e-3, foreach=kind == "torch_radam_foreach")
    optimizer.step()  # creates the state
    for parameter, (_, _, exp_avg, exp_avg_sq) in zip(parameters, tensors):
        state = optimizer.state[parameter]
        state["exp_avg"].copy_(to_tensor(exp_avg))
        state["exp_avg_sq"].copy_(to_tensor(exp_avg_sq))
        state["step"].fill_(STEADY_STEP)
    return optimizer.step
