"""fastradam: a fused, in-place RAdam optimizer step on flat buffers (Numba CPU, CUDA GPU)."""

from fastradam.api import fused_step, fused_step_layout, fused_step_multi
from fastradam.backends import available_backends
from fastradam.flavours import PRESETS, Flavour
from fastradam.layout import FlatLayout
from fastradam.plan import StepPlan
from fastradam.schedules import KerasWarmup

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "FlatLayout",
    "Flavour",
    "KerasWarmup",
    "StepPlan",
    "available_backends",
    "fused_step",
    "fused_step_layout",
    "fused_step_multi",
    "__version__",
]
