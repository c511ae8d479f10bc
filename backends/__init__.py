"""Lowering and execution: wavefront.backends."""
from wavefront.backends.torch_executor import TorchExecutor

__all__ = ["TorchExecutor"]
