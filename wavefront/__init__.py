"""wavefront: a compiler-style scheduling toolkit for recurrent sequence models.

>>> import wavefront
>>> from wavefront.models import ARMT, ARMTConfig
>>> fast = wavefront.optimize(ARMT(ARMTConfig(n_layers=2)))
"""
from wavefront import models  # noqa: E402
from wavefront.api import (  # noqa: E402
           OptimizedModel,
           VerificationError,
           explain,
           last_schedule,
           optimize,
)
from wavefront.contract.version import __version__
from wavefront.export import ExportError, export_onnx  # noqa: E402
from wavefront.profiling import profile  # noqa: E402
from wavefront.scheduler.timings import Timings  # noqa: E402
from wavefront.stages import stages  # noqa: E402

__all__ = ["models", "optimize", "explain", "last_schedule", "OptimizedModel", "VerificationError", "export_onnx",
           "ExportError", "profile", "Timings", "stages", "__version__"]
