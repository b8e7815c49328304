"""fastradam: a fused, in-place RAdam optimizer step on flat buffers (Numba CPU, CUDA GPU)."""

from fastradam.api import fused_step
from fastradam.backends import available_backends

__version__ = "0.1.0"
__all__ = ["available_backends", "fused_step", "__version__"]
