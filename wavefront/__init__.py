"""wavefront: a compiler-style scheduling toolkit for recurrent sequence models.

>>> import wavefront
>>> from wavefront.models import ARMT, ARMTConfig
>>> fast = wavefront.optimize(ARMT(ARMTConfig(n_layers=2)))
"""
from .contract.version import __version__

from . import models  # noqa: E402
from .api import OptimizedModel, VerificationError, explain, last_schedule, optimize  # noqa: E402
from .export import ExportError, export_onnx  # noqa: E402
from .profiling import profile  # noqa: E402
from .scheduler.timings import Timings  # noqa: E402
from .stages import stages  # noqa: E402

__all__ = ["models", "optimize", "explain", "last_schedule", "OptimizedModel", "VerificationError", "export_onnx",
           "ExportError", "profile", "Timings", "stages", "__version__"]
