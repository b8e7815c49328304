"""The RAdam-vs-Adam study: ``python -m fastradam.study`` trains a small CNN on scikit-learn's digits.

Four optimizers (torch Adam, Adam with linear warmup, fastradam's RAdam, RAdam with the
keras-radam warmup schedule) over a log grid of learning rates, several seeds each; writes a
Markdown report with mean +- std of final test accuracy and loss, the early-step curves and
the lr-robustness plot, and a "where RAdam loses" section derived from the numbers.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

OPTIMIZERS = ("adam", "adam_warmup", "radam", "radam_keras")
LABELS = {
    "adam": "Adam",
    "adam_warmup": "Adam + linear warmup",
    "radam": "RAdam (fastradam)",
    "radam_keras": "RAdam + keras warmup",
}
#: What a "<" comparison in the derived statements needs: a gap of at least this many points.
NOTABLE_POINTS = 0.5


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
    def quick(cls) -> "Config":
        """A few seconds: two learning rates, two seeds, two epochs (the test's mode)."""
        return cls(lrs=(1e-3, 1e-2), seeds=(0, 1), epochs=2, curve_steps=40, curve_lrs=(1e-3,))


@dataclass
class Run:
    """One training run: an optimizer at one learning rate and seed."""

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


# --------------------------------------------------------------------------- data and model


@functools.lru_cache(maxsize=1)
def load_data():
    """scikit-learn's 8x8 digits (shipped with the package), a fixed stratified 75/25 split.

    Returns float32 tensors ``x_train, y_train, x_test, y_test`` with pixels scaled to [0, 1].
    """
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
            torch.from_numpy(x_test), torch.from_numpy(y_test).long())


def make_model():
    """A small CNN: two 3x3 convolutions, a 2x2 max-pool, two linear layers (~37k parameters)."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


# --------------------------------------------------------------------------- optimizers


def make_optimizer(name: str, parameters, lr: float, total_steps: int, warmup_proportion: float):
    """The optimizer ``name`` of :data:`OPTIMIZERS` and its per-step scheduler (or None).

    * ``adam``: ``torch.optim.Adam(lr)``.
    * ``adam_warmup``: the same with ``LambdaLR`` ramping the lr linearly over the first
      ``total_steps * warmup_proportion`` steps, then constant.
    * ``radam``: ``fastradam.torch.RAdam(lr)`` (torch flavour, the default).
    * ``radam_keras``: the same with ``schedule=KerasWarmup(total_steps, warmup_proportion)``:
      the same linear warmup, then linear decay to ``min_lr = 0`` (keras-radam's defaults).
    """
    import torch

    from fastradam import KerasWarmup

    warmup = total_steps * warmup_proportion
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr), None
    if name == "adam_warmup":
        optimizer = torch.optim.Adam(parameters, lr=lr)
        # LambdaLR's argument counts the steps already taken: step t (1-based) gets factor(t - 1).
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup))
    from fastradam.torch import RAdam

    if name == "radam":
        return RAdam(parameters, lr=lr), None
    if name == "radam_keras":
        return RAdam(parameters, lr=lr, schedule=KerasWarmup(total_steps, warmup_proportion)), None
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


# --------------------------------------------------------------------------- training


def evaluate(model, x, y) -> tuple[float, float]:
    """Test accuracy (percent) and mean cross-entropy of ``model`` on ``(x, y)``."""
    import torch

    with torch.no_grad():
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item() * 100
    return accuracy, loss


def train_one(name: str, lr: float, seed: int, data, config: Config) -> Run:
    """Train one model; the seed fixes the initial weights and the batch order (same for every optimizer)."""
    import numpy as np
    import torch

    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = make_model()
    batches = len(x_train) // config.batch_size  # drop the last, short batch
    total_steps = batches * config.epochs
    optimizer, scheduler = make_optimizer(name, model.parameters(), lr, total_steps, config.warmup_proportion)
    order = torch.Generator().manual_seed(seed)
    run = Run(name, lr, seed)
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


def run_study(config: Config, progress: Callable[[str], None] = print) -> list[Run]:
    """Every optimizer x learning rate x seed of ``config``, with a progress line per cell."""
    data = load_data()
    runs = []
    cells = len(OPTIMIZERS) * len(config.lrs)
    start = time.perf_counter()
    for i, lr in enumerate(config.lrs):
        for j, name in enumerate(OPTIMIZERS):
            cell = [train_one(name, lr, seed, data, config) for seed in config.seeds]
            runs += cell
            accuracy = [r.final_accuracy for r in cell]
            progress(f"[{i * len(OPTIMIZERS) + j + 1:>2}/{cells}] lr={lr:.0e} {LABELS[name]:<22} "
                     f"test accuracy {_mean_std(accuracy)}  ({time.perf_counter() - start:.0f} s)")
    return runs


# --------------------------------------------------------------------------- summary


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite ``values`` (nan if none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def _mean_std(values: list[float], digits: int = 1) -> str:
    mean, std = _stats(values)
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarize(runs: list[Run]) -> dict[tuple[str, float], dict[str, float]]:
    """Per (optimizer, lr): mean and std over seeds of final test accuracy and loss, and divergences.

    The loss statistics leave out diverged (non-finite) runs; ``diverged`` counts them.
    """
    cells: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        cells.setdefault((run.optimizer, run.lr), []).append(run)
    summary = {}
    for key, cell in cells.items():
        acc_mean, acc_std = _stats([r.final_accuracy for r in cell])
        loss_mean, loss_std = _stats([r.final_loss for r in cell])
        summary[key] = {"accuracy_mean": acc_mean, "accuracy_std": acc_std, "loss_mean": loss_mean,
                        "loss_std": loss_std, "diverged": sum(r.diverged for r in cell), "seeds": len(cell)}
    return summary


def _lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def _paired(runs: list[Run], a: str, b: str, lr: float) -> tuple[float, float]:
    """Mean and std over seeds of accuracy(a) - accuracy(b) (same seed: same init and batches)."""
    by = {(r.optimizer, r.seed): r.final_accuracy for r in runs if r.lr == lr}
    diffs = [by[(a, s)] - by[(b, s)] for (o, s) in by if o == a and (b, s) in by]
    return _stats(diffs)


def _early_loss(runs: list[Run], name: str, lr: float) -> list[float]:
    """Per seed, the mean training loss over the first curve steps (nan for a diverged start)."""
    return [statistics.fmean(r.train_loss) if r.train_loss and all(map(math.isfinite, r.train_loss))
            else math.nan for r in runs if r.optimizer == name and r.lr == lr]


def comparisons(runs: list[Run], config: Config) -> list[str]:
    """Plain statements, derived from the numbers, of where RAdam loses (first) and where it wins.

    Pairs compared at each lr: RAdam vs Adam (no schedule on either) and RAdam + keras warmup
    vs Adam + linear warmup. A gap in final accuracy counts when the mean paired difference
    over seeds is at least :data:`NOTABLE_POINTS` points and larger than its own standard
    deviation; the early-step statements compare the mean training loss of the first
    ``curve_steps`` steps. A run "fails" when its final test accuracy is under 50 %.
    """
    summary = summarize(runs)
    loses, wins, ties = [], [], []
    compared = 0
    for radam, adam in (("radam", "adam"), ("radam_keras", "adam_warmup")):
        for lr in config.lrs:
            if (radam, lr) not in summary or (adam, lr) not in summary:
                continue
            diff, std = _paired(runs, radam, adam, lr)
            compared += 1
            a, r = summary[(adam, lr)], summary[(radam, lr)]
            text = (f"at lr={_lr(lr)}, {LABELS[adam]} {a['accuracy_mean']:.1f}% vs {LABELS[radam]} "
                    f"{r['accuracy_mean']:.1f}% final test accuracy (paired difference over {r['seeds']} seeds: "
                    f"{abs(diff):.1f} ± {std:.1f} points)")
            if abs(diff) >= NOTABLE_POINTS and abs(diff) > std:
                (loses if diff < 0 else wins).append(text)
            else:
                ties.append(text)
        for lr in config.curve_lrs:
            early_adam, early_radam = _stats(_early_loss(runs, adam, lr)), _stats(_early_loss(runs, radam, lr))
            if math.isnan(early_adam[0]) or math.isnan(early_radam[0]):
                continue
            text = (f"in the first {config.curve_steps} steps at lr={_lr(lr)}, mean training loss "
                    f"{LABELS[adam]} {early_adam[0]:.3f} ± {early_adam[1]:.3f} vs {LABELS[radam]} "
                    f"{early_radam[0]:.3f} ± {early_radam[1]:.3f} (std over seeds)")
            (loses if early_radam[0] > early_adam[0] else wins).append(text)
    lines = ["**Where RAdam loses** (Adam ahead by a clear margin):"]
    lines += [f"- {t}" for t in loses] or ["- nowhere on this grid by that margin."]
    lines += ["", "**Where RAdam wins:**"]
    lines += [f"- {t}" for t in wins] or ["- nowhere on this grid by that margin."]
    lines += ["", f"**Within noise** (final-accuracy gap under {NOTABLE_POINTS} points or under its std): "
              f"{len(ties)} of {compared} comparisons"
              + (": " + "; ".join(ties) if ties else "") + "."]
    lines += ["", "**Best learning rate per optimizer** (highest mean final accuracy) and robustness "
              "(how many of the grid's learning rates come within 1 point of that best; failed runs end "
              "under 50 % test accuracy):"]
    for name in OPTIMIZERS:
        cells = {lr: summary[(name, lr)] for lr in config.lrs if (name, lr) in summary}
        if not cells:
            continue
        best = max(cells, key=lambda lr: cells[lr]["accuracy_mean"])
        top = cells[best]["accuracy_mean"]
        near = sum(c["accuracy_mean"] >= top - 1.0 for c in cells.values())
        diverged = sum(c["diverged"] for c in cells.values())
        failed = [r for r in runs if r.optimizer == name and r.final_accuracy < 50]
        where = sorted({_lr(r.lr) for r in failed}, key=float)
        lines.append(f"- {LABELS[name]}: best {top:.1f} ± {cells[best]['accuracy_std']:.1f}% at lr={_lr(best)}; "
                     f"{near} of {len(cells)} learning rates within 1 point; {len(failed)} failed runs"
                     + (f" (lr {', '.join(where)})" if where else "") + f"; {diverged} diverged (non-finite loss)")
    return lines


# --------------------------------------------------------------------------- outputs


def _tick(value: float, _position=None) -> str:
    """A log-axis tick label as a plain number (0.02, 5) rather than a power of ten."""
    return f"{value:g}"


def plot(runs: list[Run], config: Config, out: Path) -> list[Path]:
    """The lr-robustness plot and the early-step curves, as PNGs in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    summary = summarize(runs)
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=80)
    for k, name in enumerate(OPTIMIZERS):
        lrs = [lr for lr in config.lrs if (name, lr) in summary]
        # offset the points a little along x so the error bars do not hide each other
        xs = [lr * 1.06 ** (k - 1.5) for lr in lrs]
        for ax, metric in zip(axes, ("accuracy", "loss")):
            ax.errorbar(xs, [summary[(name, lr)][f"{metric}_mean"] for lr in lrs],
                        yerr=[summary[(name, lr)][f"{metric}_std"] for lr in lrs],
                        marker="o", ms=4, capsize=3, label=LABELS[name])
    axes[0].set(xscale="log", xlabel="learning rate", ylabel="final test accuracy (%)",
                title=f"lr robustness, mean ± std over {len(config.seeds)} seeds")
    axes[1].set(xscale="log", yscale="log", xlabel="learning rate", ylabel="final test loss",
                title="final test loss (diverged runs left out)")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "lr_robustness.png")
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(len(config.curve_lrs), 2, figsize=(10, 3.6 * len(config.curve_lrs)), dpi=80,
                             squeeze=False)
    for row, lr in zip(axes, config.curve_lrs):
        for name in OPTIMIZERS:
            cell = [r for r in runs if r.optimizer == name and r.lr == lr and not r.diverged]
            if not cell:  # none run, or every seed diverged
                continue
            for ax, series in zip(row, ([r.train_loss for r in cell], [r.test_accuracy for r in cell])):
                length = min(len(s) for s in series)
                values = np.array([s[:length] for s in series], dtype=float)
                mean, std = values.mean(axis=0), values.std(axis=0, ddof=1) if len(values) > 1 else 0 * values[0]
                x = np.arange(1, length + 1)
                ax.plot(x, mean, label=LABELS[name], lw=1.2)
                # mean ± std, clipped to the seeds' own range (a loss band must stay positive)
                ax.fill_between(x, np.maximum(mean - std, values.min(axis=0)),
                                np.minimum(mean + std, values.max(axis=0)), alpha=0.2)
        row[0].set(yscale="log", xlabel="step", ylabel="training loss (batch)",
                   title=f"first {config.curve_steps} steps, lr={_lr(lr)} (diverged runs left out)")
        row[1].set(xlabel="epoch", ylabel="test accuracy (%)", title=f"test accuracy per epoch, lr={_lr(lr)}")
        row[0].yaxis.set_major_formatter(FuncFormatter(_tick))
        minor = FuncFormatter(lambda v, _: _tick(v) if _tick(v).lstrip("0.")[:1] in ("2", "5") else "")
        row[0].yaxis.set_minor_formatter(minor)
        row[1].xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "early_steps.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def machine() -> str:
    """CPU model, threads and library versions, in one line."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import fastradam

    return (f"{model}; {os.cpu_count()} logical CPUs; torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads; fastradam {fastradam.__version__} (`fastradam.torch.RAdam`)")


def render(runs: list[Run], config: Config, command: str, seconds: float) -> str:
    """The Markdown report."""
    summary = summarize(runs)
    batches = len(load_data()[0]) // config.batch_size
    header = "| lr | " + " | ".join(LABELS[n] for n in OPTIMIZERS) + " |"
    rule = "|---:|" + "---:|" * len(OPTIMIZERS)

    def table(metric: str, digits: int) -> list[str]:
        lines = [header, rule]
        for lr in config.lrs:
            cells = []
            for name in OPTIMIZERS:
                s = summary.get((name, lr))
                if s is None:
                    cells.append("")
                    continue
                text = "n/a" if math.isnan(s[f"{metric}_mean"]) else \
                    f"{s[f'{metric}_mean']:.{digits}f} ± {s[f'{metric}_std']:.{digits}f}"
                if s["diverged"]:
                    text += f" ({s['diverged']}/{s['seeds']} diverged)"
                cells.append(text)
            lines.append(f"| {_lr(lr)} | " + " | ".join(cells) + " |")
        return lines

    return "\n".join([
        "# RAdam vs Adam on scikit-learn's digits", "",
        f"Command: `{command}`  ", f"Machine: {machine()}  ", f"Wall time: {seconds:.0f} s", "",
        "## Setup", "",
        "- Data: `sklearn.datasets.load_digits` (1,797 8x8 images, 10 classes), pixels / 16, a fixed "
        "stratified split (`train_test_split(test_size=0.25, random_state=0)`): 1,347 train, 450 test.",
        f"- Model: a small CNN (conv 16, conv 32, max-pool, linear 64, linear 10); batch {config.batch_size}, "
        f"{config.epochs} epochs = {batches * config.epochs} steps; cross-entropy; no weight decay.",
        f"- Seeds {list(config.seeds)}: a seed fixes the initial weights and the batch order, the same for "
        "every optimizer (so differences are paired).",
        f"- Learning rates: {', '.join(_lr(lr) for lr in config.lrs)}; betas (0.9, 0.999), eps 1e-8 everywhere.",
        "- Adam: `torch.optim.Adam`. Adam + linear warmup: the same with `LambdaLR` ramping the lr "
        f"linearly over the first {config.warmup_proportion:.0%} of the steps "
        f"({batches * config.epochs * config.warmup_proportion:.0f}), then constant. This is the warmup "
        "length of the keras-radam arm (its default `warmup_proportion=0.1`), so the two warmup arms "
        "share it; the untuned rule of thumb 2/(1-beta2) = 2000 steps (Ma & Yarats 2019) is longer "
        "than the whole run.",
        "- RAdam: fastradam's RAdam, torch flavour (rectify when rho_t > 5). RAdam + keras warmup: "
        f"`schedule=KerasWarmup(total_steps, warmup_proportion={config.warmup_proportion})`, "
        "min_lr = 0 (keras-radam's defaults): the same warmup, then a **linear decay to 0** that "
        "the Adam + warmup arm does not have; read its final numbers with that in mind.",
        "", "## Final test accuracy (%), mean ± std over seeds", "", *table("accuracy", 1),
        "", "## Final test loss (cross-entropy), mean ± std over seeds", "",
        "Diverged runs (a non-finite training loss) are left out of the loss and counted.", "",
        *table("loss", 3),
        "", "## What the numbers say", "", *comparisons(runs, config),
        "", "## Plots", "",
        "![final test accuracy and loss vs learning rate](lr_robustness.png)", "",
        "Curves: mean over seeds, band mean ± std clipped to the seeds' own range.", "",
        "![early-step training loss and test accuracy per epoch](early_steps.png)", "",
    ])


def load_results(path: Path) -> tuple[list[Run], Config, str, float]:
    """The runs, config, command and wall time saved in a ``results.json`` of :func:`main`."""
    results = json.loads(path.read_text())
    config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["config"].items()})
    return [Run(**r) for r in results["runs"]], config, results["command"], results["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastradam.study", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two lrs, two seeds, two epochs (seconds; for tests)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 30)")
    parser.add_argument("--out", type=Path, default=Path("study-results"),
                        help="folder for report.md, the PNGs and results.json (default: ./study-results)")
    parser.add_argument("--render-only", action="store_true",
                        help="rebuild report.md and the PNGs from OUT/results.json without training")
    parser.add_argument("--threads", type=int,
                        help="call torch.set_num_threads(N) first (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        runs, config, command, seconds = load_results(args.out / "results.json")
    else:
        config = Config.quick() if args.quick else Config()
        if args.seeds:
            config = Config(**{**asdict(config), "seeds": tuple(range(args.seeds))})
        if args.epochs:
            config = Config(**{**asdict(config), "epochs": args.epochs})
        command = "python -m fastradam.study" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
        runs_total = len(OPTIMIZERS) * len(config.lrs) * len(config.seeds)
        print(f"{runs_total} runs: {len(OPTIMIZERS)} optimizers x {len(config.lrs)} lrs x {len(config.seeds)} "
              f"seeds, {config.epochs} epochs each", flush=True)
        start = time.perf_counter()
        runs = run_study(config, progress=lambda line: print(line, flush=True))
        seconds = time.perf_counter() - start
        results: dict[str, Any] = {
            "command": command, "config": asdict(config), "seconds": seconds,
            "runs": [{**asdict(r), **{k: [round(v, 5) for v in getattr(r, k)]
                                      for k in ("train_loss", "test_accuracy", "test_loss")}} for r in runs]}
        (args.out / "results.json").write_text(json.dumps(results, allow_nan=True))
    plot(runs, config, args.out)
    (args.out / "report.md").write_text(render(runs, config, command, seconds))
    print("\n" + "\n".join(comparisons(runs, config)))
    print(f"\nwritten: {args.out / 'report.md'}, lr_robustness.png, early_steps.png, results.json "
          f"({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
