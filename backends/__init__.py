"""Backends that execute schedules: wavefront.backends."""
from .torch_executor import TorchExecutor, run_schedule

__all__ = ["TorchExecutor", "run_schedule"]
