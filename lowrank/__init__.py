"""lowrank: the singular-value spectrum of every weight matrix, every training step, almost free.

Nothing here touches a GPU, Triton or CuPy at import time.
"""

from . import metrics
from .backends import BackendUnavailable
from .oneshot import svd, svdvals
from .tracking import SpectrumResult

__version__ = "0.1.0"

__all__ = ["svdvals", "svd", "metrics", "SpectrumResult", "BackendUnavailable", "__version__"]
