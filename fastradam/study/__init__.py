"""The RAdam-vs-Adam study: ``python -m fastradam.study`` trains a small CNN on scikit-learn's digits.

Four optimizers (torch Adam, Adam with linear warmup, fastradam's RAdam, RAdam with the
keras-radam warmup schedule) over a log grid of learning rates, several seeds each; writes a
Markdown report with mean +- std of final test accuracy and loss, the early-step curves and
the lr-robustness plot, and a "where RAdam loses" section derived from the numbers.

The pieces, one job each:

* :mod:`~fastradam.study.arms`: the optimizer configurations compared (:data:`ARMS`) and the
  pairs the report compares; add an arm there.
* :mod:`~fastradam.study.tasks` and :mod:`~fastradam.study.digits`: what a task provides (data
  split, model, report notes) and the digits task; add a task as a module like ``digits``.
* :mod:`~fastradam.study.results`: :class:`Config` (the grid), :class:`Run` (one run's record)
  and ``results.json``.
* :mod:`~fastradam.study.train`: the training loop over the grid.
* :mod:`~fastradam.study.stats`, :mod:`~fastradam.study.findings`: mean +- std, paired
  differences, and the statements derived from them.
* :mod:`~fastradam.study.report`, :mod:`~fastradam.study.plots`: the Markdown report and its PNGs.
* :mod:`~fastradam.study.__main__`: the command line.
"""

from fastradam.study.arms import ARMS, Arm, arm
from fastradam.study.results import Config, Run

__all__ = ["ARMS", "Arm", "Config", "Run", "arm"]
