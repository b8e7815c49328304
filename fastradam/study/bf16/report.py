"""The report: setup, the tables per task, the statements derived from them, and the plot."""

from __future__ import annotations

import math
import platform
import statistics
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from fastradam.study.bf16.arms import PARAM_ARMS, ParamArm
from fastradam.study.bf16.train import Limits, ParamRun
from fastradam.study.plots import _tick
from fastradam.study.report import machine
from fastradam.study.results import Config, lr_label
from fastradam.study.stats import cells, mean_std, mean_std_text, paired_difference
from fastradam.study.tasks import Task
from fastradam.study.train import batches_per_epoch

#: A "hurts" statement needs the final training loss this much above the fp32 reference's (relative),
#: and the paired gap larger than its own standard deviation over seeds.
HURTS_ABOVE = 0.05
#: ... and at least this much in absolute terms (a memorised training split has a loss near 0).
HURTS_ABSOLUTE = 0.01
#: The per-task tables: (a run's attribute, heading, scale, decimals).
METRICS = (("final_train_loss", "Final training loss (cross-entropy over the training split)", 1, 3),
           ("final_loss", "Final test loss (cross-entropy)", 1, 3),
           ("final_accuracy", "Final test accuracy (%)", 1, 1),
           ("frozen", "Parameter elements never changed (% of all; the values the model sees, end vs start)", 100, 1),
           ("stalled", "Parameter elements a step left unchanged (%, mean over steps)", 100, 1))
PLOT = "bf16_params.png"


def _arms(runs: list[ParamRun]) -> list[ParamArm]:
    names = {r.optimizer for r in runs}
    return [a for a in PARAM_ARMS if a.name in names]


def table(runs: list[ParamRun], config: Config, metric: str, scale: float, digits: int) -> list[str]:
    """One row per lr, one column per arm: ``metric`` mean ± std over seeds (and diverged counts)."""
    arms = _arms(runs)
    by = cells(runs)
    lines = ["| lr | " + " | ".join(a.label for a in arms) + " |", "|---:|" + "---:|" * len(arms)]
    for lr in config.lrs:
        row = []
        for arm in arms:
            cell = by.get((arm.name, lr), [])
            text = mean_std_text(*mean_std([scale * getattr(r, metric) for r in cell]), digits) if cell else ""
            diverged = sum(r.diverged for r in cell)
            row.append(text + (f" ({diverged}/{len(cell)} diverged)" if diverged else ""))
        lines.append(f"| {lr_label(lr)} | " + " | ".join(row) + " |")
    return lines


def bytes_table(runs: list[ParamRun]) -> list[str]:
    """Per arm: what keeps the values, its bytes per element, and the whole state's with the moments it ran with."""
    lines = ["| arm | kept beside the params (B/element) | moments | params + grads + moments + that (B/element) |",
             "|---|---:|---|---:|"]
    for arm in _arms(runs):
        moments = {r.moments for r in runs if r.optimizer == arm.name}
        moment_bytes = 2 * max(4 if m == "float32" else 2 for m in moments)
        param_bytes = 2 if arm.bf16 else 4
        lines.append(f"| {arm.label} | {arm.keeper_bytes} | {', '.join(sorted(moments))} | "
                     f"{2 * param_bytes + moment_bytes + arm.keeper_bytes} |")
    return lines


def _gap(runs: list[ParamRun], a: str, b: str, lr: float) -> tuple[float, float, float]:
    """The paired difference of the final training loss, a - b over seeds (mean, std), and b's mean."""
    diff, std = paired_difference(runs, a, b, lr, "final_train_loss")
    base = statistics.fmean(r.final_train_loss for r in runs if r.optimizer == b and r.lr == lr)
    return diff, std, base


def below_half_ulp(task: Task, lr: float) -> float:
    """Share of the initial weights (seed 0, rounded to bf16) whose half bf16 ulp exceeds ``lr``: an
    update of size ``lr`` (about Adam's step for a steady gradient sign) rounds away there."""
    torch.manual_seed(0)
    weights = torch.cat([p.detach().reshape(-1) for p in task.make_model().parameters()]).bfloat16().float()
    exponent = torch.frexp(weights).exponent - 1  # |w| in [2**e, 2**(e+1))
    half_ulp = torch.where(weights == 0, 0.0, torch.ldexp(torch.ones_like(weights), exponent - 8))
    return float((half_ulp > lr).double().mean())


def statements(runs: list[ParamRun], config: Config, steps: int) -> list[str]:
    """Per bf16 arm, where it hurts against the fp32 reference and where it keeps up; then how far the
    remainders runs track the fp32-master runs."""
    names = {a.name for a in _arms(runs)}
    lines = [f"**Where each arm hurts** (final training loss above the fp32 reference's by at least "
             f"{HURTS_ABOVE:.0%} and {HURTS_ABSOLUTE}, paired over seeds, the gap larger than its std; "
             "elsewhere it keeps up):"]
    for arm in _arms(runs):
        if arm.name == "fp32" or "fp32" not in names:
            continue
        hurts, fine = [], []
        for lr in config.lrs:
            diff, std, base = _gap(runs, arm.name, "fp32", lr)
            if diff >= max(HURTS_ABOVE * base, HURTS_ABSOLUTE) and diff > std:
                frozen = statistics.fmean(r.frozen for r in runs if r.optimizer == arm.name and r.lr == lr)
                hurts.append(f"at lr={lr_label(lr)} +{diff:.3f} ± {std:.3f} over {base:.3f} (+{diff / base:.0%}; "
                             f"{frozen:.1%} of the elements never changed)")
            else:
                fine.append(lr_label(lr))
        lines.append(f"- {arm.label}: " + ("hurts " + "; ".join(hurts) if hurts else "hurts nowhere on this grid")
                     + (f"; keeps up at lr {', '.join(fine)}" if fine and hurts else "") + ".")
    if {"master", "remainders"} <= names:
        lines += ["", "**Remainders vs fp32 master** (same seed and lr; the masters are bit-identical while the "
                  "gradients are, and the bf16 params the model sees differ only at exact ties, a master whose low "
                  "16 bits are 0x8000 and whose high half is even; from the first one on, the runs part. Updates "
                  "made from bfloat16 moments carry few significant bits, so ties come far more often than one "
                  "element in 2**16):"]
        for lr in config.lrs:
            cell = [r for r in runs if r.optimizer == "remainders" and r.lr == lr]
            same = sum(r.diverges_at == 0 for r in cell)
            first = [r.diverges_at for r in cell if r.diverges_at > 0]
            diff, std = paired_difference(runs, "remainders", "master", lr, "final_loss")
            lines.append(f"- lr={lr_label(lr)}: {same} of {len(cell)} runs identical to the last step"
                         + (f"; the others first differ at step {', '.join(map(str, sorted(first)))} "
                            f"(of {steps})" if first else "")
                         + f"; final parameters differ in "
                         f"{mean_std_text(*mean_std([100 * r.differ for r in cell]), 3)} "
                         f"% of elements; test loss remainders - master {diff:+.4f} ± {std:.4f}")
    return lines


def render(tasks: dict[str, tuple[Task, Config, list[ParamRun]]], command: str, seconds: float,
           limits: Limits, extra: list[str]) -> str:
    """The Markdown report; ``extra`` lines go at the end of the setup (e.g. the text's digest)."""
    lines = ["# How bf16 parameters keep their values: RAdam on two tasks", "",
             f"Command: `{command}`  ", f"Machine: {machine()}; Python {platform.python_version()}  ",
             f"Wall time: {seconds:.0f} s", "", "## Setup", "",
             "- Arms, all `fastradam.torch.RAdam` (torch flavour, betas (0.9, 0.999), eps 1e-8, no weight "
             "decay), on the same initial weights (the bf16 models start from the fp32 init rounded to "
             "nearest) and the same batches per seed:"]
    lines += [f"  - {a.label}: {a.note}" for a in PARAM_ARMS]
    lines += ["- The bf16 models hold bfloat16 parameters and gradients; their forward and backward run in "
              "float32 from the parameters' exact values, so what differs between the bf16 arms is only how "
              "the parameters keep their values.",
              "- The drop-in keeps bfloat16 moments for bfloat16 parameters (torch's choice) in every bf16 arm "
              "(the bytes table below), so the bf16 arms differ from the fp32 arm in their moments and "
              "gradients too, not from each other.",
              "- Kahan-compensated bf16 parameters (optimi's scheme) are not implemented in fastradam and not "
              "an arm here.", *extra, ""]
    for name, (task, config, runs) in tasks.items():
        batches = min(batches_per_epoch(task.load(), config), limits.steps_per_epoch or math.inf)
        lines += [f"## {task.title[0].upper() + task.title[1:]} ({name})", "",
                  f"- Data: {task.data_note}.".replace("..", "."),
                  f"- Model: {task.model_note}; batch {config.batch_size}, "
                  f"{config.epochs} epoch{'s' * (config.epochs != 1)} = "
                  f"{batches * config.epochs} steps; cross-entropy"
                  + (f"; the final training loss over the first {limits.train_examples} training examples."
                     if limits.train_examples else "."),
                  f"- Seeds {list(config.seeds)}; learning rates {', '.join(lr_label(lr) for lr in config.lrs)}.", ""]
        for metric, heading, scale, digits in METRICS:
            lines += [f"### {heading}, mean ± std over seeds", "", *table(runs, config, metric, scale, digits), ""]
        ulps = ", ".join(f"{below_half_ulp(task, lr):.1%} at {lr_label(lr)}" for lr in config.lrs)
        lines += ["### What the numbers say", "",
                  f"Share of the initial weights whose half bf16 ulp is above the lr (an update of that size is "
                  f"lost by round-to-nearest there): {ulps}; RAdam's steps are mostly smaller than lr (the "
                  f"rectification r_t < 1 for hundreds of steps, |m|/sqrt(v) < 1 for noisy gradients), so more "
                  f"elements stall than this.", "", *statements(runs, config, batches * config.epochs), ""]
    first = next(iter(tasks.values()))[2]
    lines += ["## Bytes per element", "", *bytes_table(first), "",
              "## Plot", "", f"![final losses and never-changed elements against the learning rate]({PLOT})", ""]
    return "\n".join(lines)


def _minor_tick(value: float, _position: object = None) -> str:
    """A log axis' minor tick label at 2 and 5 times a power of ten, else none."""
    return _tick(value) if _tick(value).lstrip("0.")[:1] in "25" else ""


def plot(tasks: dict[str, tuple[Task, Config, list[ParamRun]]], out: Path) -> Path:
    """Per task (a row): final training loss, final test loss and the never-changed share against the lr."""
    fig = Figure(figsize=(13, 3.8 * len(tasks)), dpi=80)
    axes = fig.subplots(len(tasks), 3, squeeze=False)
    for row, (name, (task, config, runs)) in zip(axes, tasks.items()):
        arms = _arms(runs)
        by = cells(runs)
        for k, arm in enumerate(arms):
            lrs = [lr for lr in config.lrs if (arm.name, lr) in by]
            xs = [lr * 1.06 ** (k - (len(arms) - 1) / 2) for lr in lrs]  # apart, so error bars show
            for ax, metric in zip(row, ("final_train_loss", "final_loss", "frozen")):
                values = [mean_std([getattr(r, metric) for r in by[(arm.name, lr)]]) for lr in lrs]
                scale = 100 if metric == "frozen" else 1
                ax.errorbar(xs, [scale * m for m, _ in values], yerr=[scale * s for _, s in values],
                            marker="o", ms=4, capsize=3, label=arm.label)
        row[0].set(ylabel="final training loss", title=f"{name}: final training loss")
        row[1].set(ylabel="final test loss", title=f"{name}: final test loss")
        row[2].set(ylabel="elements never changed (%)", title=f"{name}: never-changed elements")
        for ax in row:
            ax.set(xscale="log", xlabel="learning rate")
            ax.grid(True, which="both", alpha=0.3)
        for ax in row[:2]:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(_tick))
            low, high = ax.get_ylim()  # within a decade, label every minor tick; else those at 2 and 5
            ax.yaxis.set_minor_formatter(FuncFormatter(_tick if high < 10 * low else _minor_tick))
        row[0].legend(fontsize=8)
    fig.suptitle(f"bf16 parameters: mean ± std over {len(config.seeds)} seeds")
    fig.tight_layout()
    path = out / PLOT
    fig.savefig(path)
    return path

