"""The digits task: scikit-learn's 8x8 digits and a small CNN."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from fastradam.study.tasks import Split, Task


@functools.lru_cache(maxsize=1)
def load_digits_split() -> Split:
    """scikit-learn's 8x8 digits (shipped with the package), a fixed stratified 75/25 split.

    Float32 inputs of shape (n, 1, 8, 8) with pixels scaled to [0, 1], int64 targets.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    return Split(torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
                 torch.from_numpy(x_test), torch.from_numpy(y_test).long())


def digits_cnn() -> nn.Module:
    """A small CNN: two 3x3 convolutions, a 2x2 max-pool, two linear layers (~37k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


DIGITS = Task(
    title="scikit-learn's digits",
    data_note="`sklearn.datasets.load_digits` (1,797 8x8 images, 10 classes), pixels / 16, a fixed "
    "stratified split (`train_test_split(test_size=0.25, random_state=0)`): 1,347 train, 450 test.",
    model_note="a small CNN (conv 16, conv 32, max-pool, linear 64, linear 10)",
    load=load_digits_split,
    make_model=digits_cnn,
)
