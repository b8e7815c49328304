"""The study's records: :class:`Config` (what to run), :class:`Run` (what one run recorded), results.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The per-run series results.json keeps, rounded to 5 digits.
SERIES = ("train_loss", "test_accuracy", "test_loss")


@dataclass(frozen=True)
class Config:
    """One study: the grid, the seeds and the training budget."""

    lrs: tuple[float, ...] = tuple(10.0 ** (-4 + k / 2) for k in range(7))  # 1e-4 .. 1e-1
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 30
    batch_size: int = 64
    #: keras-radam's default warmup_proportion; Adam's linear warmup has the same length.
    warmup_proportion: float = 0.1
    #: Steps shown in the early-step curves, and the learning rates they are drawn at.
    curve_steps: int = 100
    curve_lrs: tuple[float, ...] = (1e-3, 10.0 ** -1.5)

    @classmethod
    def quick(cls) -> Config:
        """A few seconds: two learning rates, two seeds, two epochs (the test's mode)."""
        return cls(lrs=(1e-3, 1e-2), seeds=(0, 1), epochs=2, curve_steps=40, curve_lrs=(1e-3,))


@dataclass
class Run:
    """One training run: an optimizer (an arm's name) at one learning rate and seed."""

    optimizer: str
    lr: float
    seed: int
    train_loss: list[float] = field(default_factory=list)  # per step, the first curve_steps
    test_accuracy: list[float] = field(default_factory=list)  # per epoch
    test_loss: list[float] = field(default_factory=list)  # per epoch
    diverged: bool = False
    seconds: float = 0.0

    @property
    def final_accuracy(self) -> float:
        return self.test_accuracy[-1]

    @property
    def final_loss(self) -> float:
        return self.test_loss[-1]


def lr_label(lr: float) -> str:
    """A learning rate as the report writes it: ``1e-3``, ``3e-2``."""
    return f"{lr:.0e}".replace("e-0", "e-")


def save_results(path: Path, runs: list[Run], config: Config, command: str, seconds: float) -> None:
    """Write the runs, config, command and wall time to ``path`` (results.json)."""
    results: dict[str, Any] = {
        "command": command, "config": asdict(config), "seconds": seconds,
        "runs": [{**asdict(r), **{k: [round(v, 5) for v in getattr(r, k)] for k in SERIES}} for r in runs]}
    path.write_text(json.dumps(results, allow_nan=True))


def load_results(path: Path) -> tuple[list[Run], Config, str, float]:
    """The runs, config, command and wall time saved by :func:`save_results`."""
    results = json.loads(path.read_text())
    config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["config"].items()})
    return [Run(**r) for r in results["runs"]], config, results["command"], results["seconds"]
