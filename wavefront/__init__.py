"""wavefront: a compiler-style scheduling toolkit for recurrent sequence models.

>>> import wavefront
>>> from wavefront.models import ARMT, ARMTConfig
>>> fast = wavefront.optimize(ARMT(ARMTConfig(n_layers=2)))
"""
from wavefront import distributed, models
from wavefront.api import (
           Optimized,
           OptimizedModel,
           UnchangedModel,
           VerificationError,
           explain,
           last_schedule,
           optimize,
)
from wavefront.contract.version import __version__
from wavefront.export import ExportError, export_onnx
from wavefront.pretrained import from_pretrained
from wavefront.profiling import profile
from wavefront.scheduler.timings import Timings
from wavefront.stages import stages

__all__ = ["distributed", "models", "optimize", "explain", "last_schedule", "Optimized", "OptimizedModel", "UnchangedModel",
           "VerificationError", "export_onnx", "ExportError", "from_pretrained", "profile", "Timings", "stages", "__version__"]
