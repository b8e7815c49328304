"""The report's PNGs: final accuracy and loss against the learning rate, and the early-step curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from fastradam.study.arms import ARMS
from fastradam.study.results import Config, Run, lr_label
from fastradam.study.stats import summarize


def _tick(value: float, _position: object = None) -> str:
    """A log-axis tick label as a plain number (0.02, 5) rather than a power of ten."""
    return f"{value:g}"


def plot(runs: list[Run], config: Config, out: Path) -> list[Path]:
    """``lr_robustness.png`` and ``early_steps.png`` in ``out``; returns their paths."""
    paths = [out / "lr_robustness.png", out / "early_steps.png"]
    for path, draw in zip(paths, (_lr_robustness, _early_steps)):
        fig = draw(runs, config)
        fig.tight_layout()
        fig.savefig(path)
    return paths


def _lr_robustness(runs: list[Run], config: Config) -> Figure:
    """Final test accuracy and loss, mean ± std over seeds, against the learning rate."""
    summary = summarize(runs)
    fig = Figure(figsize=(10, 4), dpi=80)
    axes = fig.subplots(1, 2)
    for k, arm in enumerate(ARMS):
        lrs = [lr for lr in config.lrs if (arm.name, lr) in summary]
        # offset the points a little along x so the error bars do not hide each other
        xs = [lr * 1.06 ** (k - (len(ARMS) - 1) / 2) for lr in lrs]
        for ax, metric in zip(axes, ("accuracy", "loss")):
            ax.errorbar(xs, [summary[(arm.name, lr)][f"{metric}_mean"] for lr in lrs],
                        yerr=[summary[(arm.name, lr)][f"{metric}_std"] for lr in lrs],
                        marker="o", ms=4, capsize=3, label=arm.label)
    axes[0].set(xscale="log", xlabel="learning rate", ylabel="final test accuracy (%)",
                title=f"lr robustness, mean ± std over {len(config.seeds)} seeds")
    axes[1].set(xscale="log", yscale="log", xlabel="learning rate", ylabel="final test loss",
                title="final test loss (diverged runs left out)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    return fig


def _early_steps(runs: list[Run], config: Config) -> Figure:
    """Per curve lr: the training loss of the first steps and the test accuracy per epoch."""
    fig = Figure(figsize=(10, 3.6 * len(config.curve_lrs)), dpi=80)
    axes = fig.subplots(len(config.curve_lrs), 2, squeeze=False)
    for row, lr in zip(axes, config.curve_lrs):
        for arm in ARMS:
            cell = [r for r in runs if r.optimizer == arm.name and r.lr == lr and not r.diverged]
            if not cell:  # none run, or every seed diverged
                continue
            for ax, series in zip(row, ([r.train_loss for r in cell], [r.test_accuracy for r in cell])):
                length = min(len(s) for s in series)
                values = np.array([s[:length] for s in series], dtype=float)
                mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(values) > 1 else 0 * values[0]
                x = np.arange(1, length + 1)
                ax.plot(x, mean, label=arm.label, lw=1.2)
                # mean ± std, clipped to the seeds' own range (a loss band must stay positive)
                ax.fill_between(x, np.maximum(mean - std, values.min(axis=0)),
                                np.minimum(mean + std, values.max(axis=0)), alpha=0.2)
        row[0].set(yscale="log", xlabel="step", ylabel="training loss (batch)",
                   title=f"first {config.curve_steps} steps, lr={lr_label(lr)} (diverged runs left out)")
        row[1].set(xlabel="epoch", ylabel="test accuracy (%)", title=f"test accuracy per epoch, lr={lr_label(lr)}")
        row[0].yaxis.set_major_formatter(FuncFormatter(_tick))
        minor = FuncFormatter(lambda v, _: _tick(v) if _tick(v).lstrip("0.")[:1] in ("2", "5") else "")
        row[0].yaxis.set_minor_formatter(minor)
        row[1].xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=8)
    return fig

