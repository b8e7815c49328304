"""The arms: how each one keeps the parameters' values, and what it costs in bytes per element.

Every arm is :class:`fastradam.torch.RAdam` (torch flavour, betas (0.9, 0.999), eps 1e-8) with
one way of keeping the values; the bf16 arms' models hold bfloat16 parameters and gradients and
compute in float32 from them (:class:`Bf16Params`), so the arms differ only in how the
parameters keep their values, and the fp32 arm in its float32 gradients.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fastradam.torch import RAdam


class Bf16Params(nn.Module):
    """``module`` with its parameters stored in bfloat16 and its forward (and so the backward)
    computed in float32 from their exact values; the gradients arrive in bfloat16, the
    parameters' dtype. Inputs and outputs are as ``module``'s (float32 logits)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exact = {name: p.float() for name, p in self.module.named_parameters()}
        return torch.func.functional_call(self.module, exact, (x,))


@dataclass(frozen=True)
class ParamArm:
    """One way of keeping the parameters: ``name`` keys results.json, ``label`` names it in the report."""

    name: str
    label: str
    #: Whether the model holds bfloat16 parameters (else float32).
    bf16: bool
    #: The drop-in's keyword arguments for a run's seed.
    options: Callable[[int], dict[str, Any]]
    #: Bytes per element the optimizer keeps beside the parameters to keep their values.
    keeper_bytes: int
    #: The report's line on what the arm is.
    note: str

    def model(self, module: nn.Module) -> nn.Module:
        """``module`` as this arm's model holds it."""
        return Bf16Params(module) if self.bf16 else module

    def build(self, parameters: Iterable[nn.Parameter], lr: float, seed: int) -> RAdam:
        """This arm's optimizer at ``lr`` (``seed`` seeds stochastic rounding)."""
        return RAdam(parameters, lr=lr, **self.options(seed))

    def available(self) -> bool:
        """Whether this build of the drop-in takes the arm's options."""
        taken = inspect.signature(RAdam).parameters
        return all(key in taken for key in self.options(0))


#: Every arm, in the report's column order: the reference first, round-to-nearest last.
PARAM_ARMS: tuple[ParamArm, ...] = (
    ParamArm("fp32", "fp32 params", False, lambda seed: {}, 0,
             "float32 parameters and gradients (the reference)."),
    ParamArm("master", "bf16 + fp32 master", True, lambda seed: {"master_weights": True}, 4,
             "`master_weights=True`: the optimizer keeps a float32 master (4 B per element) and writes "
             "its round-to-nearest-even bfloat16 into the parameters."),
    ParamArm("remainders", "bf16 + remainders", True,
             lambda seed: {"master_weights": True, "store_param_remainders": True}, 2,
             "`master_weights=True, store_param_remainders=True`: an int16 remainder per element (2 B) "
             "that with the bfloat16 parameter is the float32 master bit for bit (Transformer Engine's "
             "format; the parameter is the master rounded to nearest with ties away from zero)."),
    ParamArm("stochastic", "bf16 + stochastic rounding", True,
             lambda seed: {"bf16_stochastic_round": True, "stochastic_round_seed": seed}, 0,
             "`bf16_stochastic_round=True, stochastic_round_seed=<the run's seed>`: no master; each step's "
             "float32 result is rounded to bfloat16 stochastically (counter-hash bits, 0 B)."),
    ParamArm("nearest", "bf16, round-to-nearest", True, lambda seed: {}, 0,
             "plain bfloat16 parameters: each step's float32 result rounded to nearest even, nothing "
             "kept (0 B)."),
)
_BY_NAME = {a.name: a for a in PARAM_ARMS}


def param_arm(name: str) -> ParamArm:
    """The arm called ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown arm {name!r}; expected one of {tuple(_BY_NAME)}") from None
