"""One run of an arm on a task with its stall counts, the grid of runs, and results.json.

A run records, beside the study's series, the final loss over the whole training split, how
many parameter elements never changed (the values the model sees, at the end against the
start) and how many each step left unchanged, on average. The remainders arm's runs are also
compared with the fp32-master arm's (same seed, lr): the first step whose batch loss differs,
and the share of final parameter elements that differ.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch

from fastradam.study.bf16.arms import ParamArm
from fastradam.study.results import SERIES, Config, Run
from fastradam.study.tasks import Task
from fastradam.study.train import batches_per_epoch, evaluate


@dataclass
class ParamRun(Run):
    """A :class:`~fastradam.study.results.Run` (``optimizer`` is the arm's name) with the numbers of this study."""

    task: str = ""
    #: Mean cross-entropy over the whole training split at the end.
    final_train_loss: float = math.nan
    #: Share of parameter elements whose value (as the model sees it) is the same at the end as at the start.
    frozen: float = math.nan
    #: Mean over steps of the share of parameter elements the step left unchanged.
    stalled: float = math.nan
    #: The moments' dtype in the optimizer's state.
    moments: str = ""
    #: Remainders arm only: the first step whose batch loss differs from the fp32-master run's (0: none).
    diverges_at: int = -1
    #: Remainders arm only: share of final parameter elements that differ from the fp32-master run's.
    differ: float = math.nan


class Trace(NamedTuple):
    """A run and what the comparison of two runs needs: every step's batch loss, the final parameters."""

    run: ParamRun
    losses: list[float]
    final: torch.Tensor


def _flat(model: torch.nn.Module) -> torch.Tensor:
    """The model's parameters, concatenated (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Limits(NamedTuple):
    """Caps for quick runs: batches per epoch, and training examples the final training loss covers
    (None: no cap)."""

    steps_per_epoch: int | None = None
    train_examples: int | None = None


def _epochs(n: int, config: Config, batches: int, order: torch.Generator) -> Iterator[list[torch.Tensor]]:
    """Per epoch, the example indices of its ``batches`` batches (a fresh permutation from ``order``)."""
    for _ in range(config.epochs):
        permutation = torch.randperm(n, generator=order)
        yield [permutation[b * config.batch_size:(b + 1) * config.batch_size] for b in range(batches)]


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimizer step on the batch ``(x, y)``; returns its loss."""
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_one(task: Task, name: str, arm: ParamArm, lr: float, seed: int, config: Config,
              limits: Limits = Limits()) -> Trace:
    """Train one model (seed: initial weights and batch order, the same for every arm)."""
    x_train, y_train, x_test, y_test = split = task.load()
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = arm.model(task.make_model())
    optimizer = arm.build(model.parameters(), lr, seed)
    batches = min(batches_per_epoch(split, config), limits.steps_per_epoch or math.inf)
    run = ParamRun(arm.name, lr, seed, task=name)
    losses: list[float] = []
    scores: list[tuple[float, float]] = []  # per epoch: test accuracy, test loss
    start_values = before = _flat(model)
    unchanged = 0
    start = time.perf_counter()
    for epoch in _epochs(len(x_train), config, batches, torch.Generator().manual_seed(seed)):
        for index in epoch:
            losses.append(_step(model, optimizer, x_train[index], y_train[index]))
            after = _flat(model)
            unchanged += int((after == before).sum())
            before = after
            if not math.isfinite(losses[-1]):
                run.diverged = True
                break
        scores.append(evaluate(model, x_test, y_test))
        if run.diverged:
            break
    run.test_accuracy, run.test_loss = (list(series) for series in zip(*scores))
    run.train_loss = losses[:config.curve_steps]
    run.final_train_loss = evaluate(model, x_train[:limits.train_examples], y_train[:limits.train_examples])[1]
    run.frozen = float((before == start_values).double().mean())
    run.stalled = unchanged / (len(losses) * before.numel())
    run.moments = str(next(iter(optimizer.state.values()))["exp_avg"].dtype).removeprefix("torch.")
    run.seconds = time.perf_counter() - start
    return Trace(run, losses, before)


def compare(trace: Trace, reference: Trace) -> None:
    """Record on ``trace.run`` where it departs from ``reference`` (the same seed and lr)."""
    differs = [k for k, (a, b) in enumerate(zip(trace.losses, reference.losses)) if a != b]
    trace.run.diverges_at = differs[0] + 1 if differs else 0
    trace.run.differ = float((trace.final != reference.final).double().mean())


def run_grid(name: str, task: Task, arms: tuple[ParamArm, ...], config: Config, limits: Limits = Limits(),
             progress: Callable[[str], None] = print) -> list[ParamRun]:
    """Every arm x lr x seed of ``config`` on ``task``, a progress line per cell; the remainders
    runs compared with the fp32-master runs."""
    runs: list[ParamRun] = []
    start = time.perf_counter()
    for i, lr in enumerate(config.lrs):
        traces: dict[str, list[Trace]] = {}
        for j, arm in enumerate(arms):
            traces[arm.name] = [train_one(task, name, arm, lr, seed, config, limits) for seed in config.seeds]
            losses = [t.run.final_loss for t in traces[arm.name]]
            frozen = [t.run.frozen for t in traces[arm.name]]
            progress(f"[{i * len(arms) + j + 1:>2}/{len(arms) * len(config.lrs)}] {name} lr={lr:.0e} "
                     f"{arm.label:<27} test loss {np.mean(losses):.3f}, frozen {np.mean(frozen):.1%}  "
                     f"({time.perf_counter() - start:.0f} s)")
        if "remainders" in traces and "master" in traces:
            for trace, reference in zip(traces["remainders"], traces["master"]):
                compare(trace, reference)
        runs += [t.run for cell in traces.values() for t in cell]
    return runs


def save(path: Path, tasks: dict[str, tuple[Config, list[ParamRun]]], command: str, seconds: float,
         limits: Limits, threads: int) -> None:
    """results.json: the command, wall time, limits, torch's thread count, and per task its config and
    runs (series rounded to 5 digits)."""
    results: dict[str, Any] = {
        "command": command, "seconds": seconds, "limits": limits._asdict(), "threads": threads,
        "tasks": {name: {"config": asdict(config), "runs": [
            {**asdict(r), **{k: [round(v, 5) for v in getattr(r, k)] for k in SERIES}} for r in runs]}
            for name, (config, runs) in tasks.items()}}
    path.write_text(json.dumps(results, allow_nan=True))


def load(path: Path) -> tuple[dict[str, tuple[Config, list[ParamRun]]], str, float, Limits, int]:
    """What :func:`save` wrote: per task (config, runs), the command, the wall time, the limits, the threads."""
    results = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(Config)}
    tasks = {}
    for name, task in results["tasks"].items():
        config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in task["config"].items() if k in fields})
        tasks[name] = config, [ParamRun(**r) for r in task["runs"]]
    return tasks, results["command"], results["seconds"], Limits(**results["limits"]), results["threads"]
