"""What a task gives the study: a fixed data split, a fresh model, and the report's notes on both.

The model maps a batch of inputs to class logits; training minimises their cross-entropy and
the test split is scored by accuracy and cross-entropy. Adding a task: a module like
:mod:`fastradam.study.digits` that builds a :class:`Task`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch


class Split(NamedTuple):
    """Inputs and integer class targets, for training and for test."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class Task:
    """A training task: ``load`` returns the same split on every call; ``make_model`` a freshly
    initialised model (from torch's global seed)."""

    #: The report's heading says "RAdam vs Adam on <title>".
    title: str
    #: The report's Data and Model bullets (the model bullet goes on with the training budget).
    data_note: str
    model_note: str
    load: Callable[[], Split]
    make_model: Callable[[], torch.nn.Module]
