"""Training: one run of an arm on a task, and the whole grid of a :class:`~fastradam.study.results.Config`."""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from fastradam.study.arms import ARMS, Arm
from fastradam.study.results import Config, Run
from fastradam.study.stats import mean_std, mean_std_text
from fastradam.study.tasks import Split, Task


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Test accuracy (percent) and mean cross-entropy of ``model`` on ``(x, y)``."""
    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item() * 100
    return accuracy, loss


def batches_per_epoch(split: Split, config: Config) -> int:
    """Full batches of the training split (the last, short batch is dropped)."""
    return len(split.x_train) // config.batch_size


def train_one(task: Task, arm: Arm, lr: float, seed: int, config: Config) -> Run:
    """Train one model; the seed fixes the initial weights and the batch order (same for every arm)."""
    split = task.load()
    x_train, y_train, x_test, y_test = split
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = task.make_model()
    batches = batches_per_epoch(split, config)
    optimizer, scheduler = arm.build(model.parameters(), lr, batches * config.epochs, config.warmup_proportion)
    order = torch.Generator().manual_seed(seed)
    run = Run(arm.name, lr, seed)
    start = time.perf_counter()
    step = 0
    for _ in range(config.epochs):
        permutation = torch.randperm(len(x_train), generator=order)
        for b in range(batches):
            index = permutation[b * config.batch_size:(b + 1) * config.batch_size]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            if step <= config.curve_steps:
                run.train_loss.append(loss.item())
            if not math.isfinite(loss.item()):
                run.diverged = True
                break
        accuracy, test_loss = evaluate(model, x_test, y_test)
        run.test_accuracy.append(accuracy)
        run.test_loss.append(test_loss)
        if run.diverged:
            break
    run.seconds = time.perf_counter() - start
    return run


def run_study(task: Task, config: Config, progress: Callable[[str], None] = print) -> list[Run]:
    """Every arm x learning rate x seed of ``config``, with a progress line per cell."""
    runs = []
    cells = len(ARMS) * len(config.lrs)
    start = time.perf_counter()
    for i, lr in enumerate(config.lrs):
        for j, arm in enumerate(ARMS):
            cell = [train_one(task, arm, lr, seed, config) for seed in config.seeds]
            runs += cell
            accuracy = mean_std_text(*mean_std([r.final_accuracy for r in cell]))
            progress(f"[{i * len(ARMS) + j + 1:>2}/{cells}] lr={lr:.0e} {arm.label:<22} "
                     f"test accuracy {accuracy}  ({time.perf_counter() - start:.0f} s)")
    return runs
