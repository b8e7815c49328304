"""The Markdown report: setup, the accuracy and loss tables, the derived statements, the plots."""

from __future__ import annotations

import os
import platform

import torch

import fastradam
from fastradam.study import arms
from fastradam.study.arms import ARMS
from fastradam.study.findings import comparisons
from fastradam.study.results import Config, Run, lr_label
from fastradam.study.stats import Summary, mean_std_text, summarize
from fastradam.study.tasks import Task
from fastradam.study.train import batches_per_epoch


def machine() -> str:
    """CPU model, threads and library versions, in one line."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{model}; {os.cpu_count()} logical CPUs; torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads; fastradam {fastradam.__version__} (`fastradam.torch.RAdam`)")


def _table(summary: Summary, config: Config, metric: str, digits: int) -> list[str]:
    """One row per lr, one column per arm: ``metric`` mean ± std, and how many seeds diverged."""
    lines = ["| lr | " + " | ".join(a.label for a in ARMS) + " |", "|---:|" + "---:|" * len(ARMS)]
    for lr in config.lrs:
        cells = []
        for each in ARMS:
            s = summary.get((each.name, lr))
            if s is None:
                cells.append("")
                continue
            text = mean_std_text(s[f"{metric}_mean"], s[f"{metric}_std"], digits)
            if s["diverged"]:
                text += f" ({s['diverged']}/{s['seeds']} diverged)"
            cells.append(text)
        lines.append(f"| {lr_label(lr)} | " + " | ".join(cells) + " |")
    return lines


def render(task: Task, runs: list[Run], config: Config, command: str, seconds: float) -> str:
    """The Markdown report of ``runs`` on ``task``."""
    summary = summarize(runs)
    steps = batches_per_epoch(task.load(), config) * config.epochs
    return "\n".join([
        f"# RAdam vs Adam on {task.title}", "",
        f"Command: `{command}`  ", f"Machine: {machine()}  ", f"Wall time: {seconds:.0f} s", "",
        "## Setup", "",
        f"- Data: {task.data_note}",
        f"- Model: {task.model_note}; batch {config.batch_size}, "
        f"{config.epochs} epochs = {steps} steps; cross-entropy; no weight decay.",
        f"- Seeds {list(config.seeds)}: a seed fixes the initial weights and the batch order, the same for "
        "every optimizer (so differences are paired).",
        f"- Learning rates: {', '.join(lr_label(lr) for lr in config.lrs)}; betas (0.9, 0.999), eps 1e-8 everywhere.",
        *arms.setup_lines(steps, config.warmup_proportion),
        "", "## Final test accuracy (%), mean ± std over seeds", "", *_table(summary, config, "accuracy", 1),
        "", "## Final test loss (cross-entropy), mean ± std over seeds", "",
        "Diverged runs (a non-finite training loss) are left out of the loss and counted.", "",
        *_table(summary, config, "loss", 3),
        "", "## What the numbers say", "", *comparisons(runs, config),
        "", "## Plots", "",
        "![final test accuracy and loss vs learning rate](lr_robustness.png)", "",
        "Curves: mean over seeds, band mean ± std clipped to the seeds' own range.", "",
        "![early-step training loss and test accuracy per epoch](early_steps.png)", "",
    ])
