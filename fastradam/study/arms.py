"""The study's arms: each optimizer configuration it trains, and the pairs the report compares.

Adding an arm: a builder, a row in :data:`ARMS`, a row in :data:`PAIRS` if the report should
compare it with another arm, and a line in :func:`setup_lines` saying what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from fastradam import KerasWarmup
from fastradam.torch import RAdam

Parameters = Iterable[torch.nn.Parameter]
#: An optimizer and its per-step scheduler (or None).
Built = tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]
#: ``build(parameters, lr, total_steps, warmup_proportion)``.
Builder = Callable[[Parameters, float, int, float], Built]


@dataclass(frozen=True)
class Arm:
    """One optimizer configuration: ``name`` is its key in results.json, ``label`` its name in the report."""

    name: str
    label: str
    build: Builder


def _adam(parameters: Parameters, lr: float, total_steps: int, warmup_proportion: float) -> Built:
    """``torch.optim.Adam(lr)``."""
    return torch.optim.Adam(parameters, lr=lr), None


def _adam_warmup(parameters: Parameters, lr: float, total_steps: int, warmup_proportion: float) -> Built:
    """Adam with ``LambdaLR`` ramping the lr linearly over the first ``total_steps * warmup_proportion``
    steps, then constant."""
    warmup = total_steps * warmup_proportion
    optimizer = torch.optim.Adam(parameters, lr=lr)
    # LambdaLR's argument counts the steps already taken: step t (1-based) gets factor(t - 1).
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup))


def _radam(parameters: Parameters, lr: float, total_steps: int, warmup_proportion: float) -> Built:
    """``fastradam.torch.RAdam(lr)`` (torch flavour, the default)."""
    return RAdam(parameters, lr=lr), None


def _radam_keras(parameters: Parameters, lr: float, total_steps: int, warmup_proportion: float) -> Built:
    """RAdam with ``schedule=KerasWarmup(total_steps, warmup_proportion)``: the same linear warmup,
    then linear decay to ``min_lr = 0`` (keras-radam's defaults)."""
    return RAdam(parameters, lr=lr, schedule=KerasWarmup(total_steps, warmup_proportion)), None


#: Every arm, in the report's column order.
ARMS: tuple[Arm, ...] = (
    Arm("adam", "Adam", _adam),
    Arm("adam_warmup", "Adam + linear warmup", _adam_warmup),
    Arm("radam", "RAdam (fastradam)", _radam),
    Arm("radam_keras", "RAdam + keras warmup", _radam_keras),
)
_BY_NAME = {a.name: a for a in ARMS}

#: (RAdam arm, the Adam arm it is compared with): no schedule on either, then the same warmup on both.
PAIRS: tuple[tuple[str, str], ...] = (("radam", "adam"), ("radam_keras", "adam_warmup"))


def arm(name: str) -> Arm:
    """The arm called ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {tuple(_BY_NAME)}") from None


def setup_lines(total_steps: int, warmup_proportion: float) -> list[str]:
    """The report's Setup bullets that say what the arms are."""
    return [
        "- Adam: `torch.optim.Adam`. Adam + linear warmup: the same with `LambdaLR` ramping the lr "
        f"linearly over the first {warmup_proportion:.0%} of the steps "
        f"({total_steps * warmup_proportion:.0f}), then constant. This is the warmup "
        "length of the keras-radam arm (its default `warmup_proportion=0.1`), so the two warmup arms "
        "share it; the untuned rule of thumb 2/(1-beta2) = 2000 steps (Ma & Yarats 2019) is longer "
        "than the whole run.",
        "- RAdam: fastradam's RAdam, torch flavour (rectify when rho_t > 5). RAdam + keras warmup: "
        f"`schedule=KerasWarmup(total_steps, warmup_proportion={warmup_proportion})`, "
        "min_lr = 0 (keras-radam's defaults): the same warmup, then a **linear decay to 0** that "
        "the Adam + warmup arm does not have; read its final numbers with that in mind.",
    ]
