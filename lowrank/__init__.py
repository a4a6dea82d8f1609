"""lowrank: the singular-value spectrum of every weight matrix, every training step, almost free.

Nothing here touches a GPU, Triton or CuPy at import time.
"""

from . import metrics
from .backends import BackendUnavailable
from .oneshot import svd, svdvals
from .optim import SpectralSGD
from .runlog import RunLog, load_config, load_log
from .tracker import SpectrumTracker
from .tracking import SpectrumResult

__version__ = "0.1.0"

__all__ = [
    "SpectralSGD", "SpectrumTracker", "SpectrumResult", "RunLog", "load_log", "load_config",
    "svdvals", "svd", "metrics", "BackendUnavailable", "__version__",
]
