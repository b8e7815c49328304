"""Plain statements derived from the numbers: where RAdam loses, where it wins, which lr suits each arm."""

from __future__ import annotations

import math

from fastradam.study.arms import ARMS, PAIRS, arm
from fastradam.study.results import Config, Run, lr_label
from fastradam.study.stats import Summary, early_loss, mean_std, paired_difference, summarize

#: What a "<" comparison in the derived statements needs: a gap of at least this many points.
NOTABLE_POINTS = 0.5
#: A run "fails" when its final test accuracy is under this (percent).
FAILED_BELOW = 50


def comparisons(runs: list[Run], config: Config) -> list[str]:
    """Markdown lines of where RAdam loses (first) and where it wins, then each arm's best lr.

    Pairs compared at each lr (:data:`~fastradam.study.arms.PAIRS`): RAdam vs Adam (no schedule
    on either) and RAdam + keras warmup vs Adam + linear warmup. A gap in final accuracy counts
    when the mean paired difference over seeds is at least :data:`NOTABLE_POINTS` points and
    larger than its own standard deviation; the early-step statements compare the mean
    training loss of the first ``curve_steps`` steps.
    """
    summary = summarize(runs)
    loses, wins, ties = [], [], []
    compared = 0
    for radam, adam in PAIRS:
        a_label, r_label = arm(adam).label, arm(radam).label
        for lr in config.lrs:
            if (radam, lr) not in summary or (adam, lr) not in summary:
                continue
            diff, std = paired_difference(runs, radam, adam, lr)
            compared += 1
            a, r = summary[(adam, lr)], summary[(radam, lr)]
            text = (f"at lr={lr_label(lr)}, {a_label} {a['accuracy_mean']:.1f}% vs {r_label} "
                    f"{r['accuracy_mean']:.1f}% final test accuracy (paired difference over {r['seeds']} seeds: "
                    f"{abs(diff):.1f} ± {std:.1f} points)")
            if abs(diff) >= NOTABLE_POINTS and abs(diff) > std:
                (loses if diff < 0 else wins).append(text)
            else:
                ties.append(text)
        for lr in config.curve_lrs:
            early_adam, early_radam = mean_std(early_loss(runs, adam, lr)), mean_std(early_loss(runs, radam, lr))
            if math.isnan(early_adam[0]) or math.isnan(early_radam[0]):
                continue
            text = (f"in the first {config.curve_steps} steps at lr={lr_label(lr)}, mean training loss "
                    f"{a_label} {early_adam[0]:.3f} ± {early_adam[1]:.3f} vs {r_label} "
                    f"{early_radam[0]:.3f} ± {early_radam[1]:.3f} (std over seeds)")
            (loses if early_radam[0] > early_adam[0] else wins).append(text)
    lines = ["**Where RAdam loses** (Adam ahead by a clear margin):"]
    lines += [f"- {t}" for t in loses] or ["- nowhere on this grid by that margin."]
    lines += ["", "**Where RAdam wins:**"]
    lines += [f"- {t}" for t in wins] or ["- nowhere on this grid by that margin."]
    lines += ["", f"**Within noise** (final-accuracy gap under {NOTABLE_POINTS} points or under its std): "
              f"{len(ties)} of {compared} comparisons"
              + (": " + "; ".join(ties) if ties else "") + "."]
    return lines + _best_learning_rates(runs, config, summary)


def _best_learning_rates(runs: list[Run], config: Config, summary: Summary) -> list[str]:
    """Per arm: its best lr, how many lrs come within 1 point of it, its failed and diverged runs."""
    lines = ["", "**Best learning rate per optimizer** (highest mean final accuracy) and robustness "
             "(how many of the grid's learning rates come within 1 point of that best; failed runs end "
             f"under {FAILED_BELOW} % test accuracy):"]
    for each in ARMS:
        cells = {lr: summary[(each.name, lr)] for lr in config.lrs if (each.name, lr) in summary}
        if not cells:
            continue
        best = max(cells, key=lambda lr: cells[lr]["accuracy_mean"])
        top = cells[best]["accuracy_mean"]
        near = sum(c["accuracy_mean"] >= top - 1.0 for c in cells.values())
        diverged = sum(c["diverged"] for c in cells.values())
        failed = [r for r in runs if r.optimizer == each.name and r.final_accuracy < FAILED_BELOW]
        where = sorted({lr_label(r.lr) for r in failed}, key=float)
        lines.append(f"- {each.label}: best {top:.1f} ± {cells[best]['accuracy_std']:.1f}% at lr={lr_label(best)}; "
                     f"{near} of {len(cells)} learning rates within 1 point; {len(failed)} failed runs"
                     + (f" (lr {', '.join(where)})" if where else "") + f"; {diverged} diverged (non-finite loss)")
    return lines
