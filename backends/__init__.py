"""Lowering and execution: wavefront.backends."""
from .torch_executor import TorchExecutor

__all__ = ["TorchExecutor"]
