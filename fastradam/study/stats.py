"""The numbers the report is made of: mean +- std over seeds, per-cell summaries, paired differences."""

from __future__ import annotations

import math
import statistics

from fastradam.study.results import Run

#: Per (arm name, lr): accuracy_mean, accuracy_std, loss_mean, loss_std, diverged, seeds.
Summary = dict[tuple[str, float], dict[str, float]]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite ``values`` (nan if none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def mean_std_text(mean: float, std: float, digits: int = 1) -> str:
    """``mean ± std`` to ``digits`` decimals, or ``n/a`` for a nan mean."""
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def cells(runs: list[Run]) -> dict[tuple[str, float], list[Run]]:
    """The runs per (optimizer, lr), in the order given."""
    by: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        by.setdefault((run.optimizer, run.lr), []).append(run)
    return by


def summarize(runs: list[Run]) -> Summary:
    """Per (optimizer, lr): mean and std over seeds of final test accuracy and loss, and divergences.

    The loss statistics leave out diverged (non-finite) runs; ``diverged`` counts them.
    """
    summary = {}
    for key, cell in cells(runs).items():
        acc_mean, acc_std = mean_std([r.final_accuracy for r in cell])
        loss_mean, loss_std = mean_std([r.final_loss for r in cell])
        summary[key] = {"accuracy_mean": acc_mean, "accuracy_std": acc_std, "loss_mean": loss_mean,
                        "loss_std": loss_std, "diverged": sum(r.diverged for r in cell), "seeds": len(cell)}
    return summary


def paired_difference(runs: list[Run], a: str, b: str, lr: float,
                      metric: str = "final_accuracy") -> tuple[float, float]:
    """Mean and std over seeds of metric(a) - metric(b) (same seed: same init and batches);
    ``metric`` names a run's attribute (final test accuracy by default)."""
    by = {(r.optimizer, r.seed): getattr(r, metric) for r in runs if r.lr == lr}
    diffs = [by[(a, s)] - by[(b, s)] for (o, s) in by if o == a and (b, s) in by]
    return mean_std(diffs)


def early_loss(runs: list[Run], name: str, lr: float) -> list[float]:
    """Per seed, the mean training loss over the first curve steps (nan for a diverged start)."""
    return [statistics.fmean(r.train_loss) if r.train_loss and all(map(math.isfinite, r.train_loss))
            else math.nan for r in runs if r.optimizer == name and r.lr == lr]
