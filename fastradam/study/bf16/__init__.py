"""How bfloat16 parameters keep their values: ``python -m fastradam.study.bf16``.

Five arms of fastradam's drop-in RAdam on the same models, seeds and batches: float32 parameters
(the reference), bfloat16 parameters with an fp32 master (``master_weights=True``), with int16
remainders (``store_param_remainders=True``), with stochastic rounding
(``bf16_stochastic_round=True``), and with round-to-nearest only. Two tasks: the study's digits
CNN and a character-level language model (:mod:`fastradam.study.charlm`). Writes report.md,
``bf16_params.png`` and results.json.

The pieces, beside the RAdam-vs-Adam study's (whose tasks, :class:`~fastradam.study.results.Config`,
statistics and machine line they reuse):

* :mod:`~fastradam.study.bf16.arms`: the arms (:data:`PARAM_ARMS`) and the bf16 model wrapper.
* :mod:`~fastradam.study.bf16.train`: one run with its stall counts, the grid, results.json.
* :mod:`~fastradam.study.bf16.report`: the Markdown report, its statements and the plot.
* :mod:`~fastradam.study.bf16.__main__`: the command line.
"""

from fastradam.study.bf16.arms import PARAM_ARMS, ParamArm
from fastradam.study.bf16.train import ParamRun

__all__ = ["PARAM_ARMS", "ParamArm", "ParamRun"]
