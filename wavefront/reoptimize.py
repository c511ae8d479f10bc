"""Loading a pickled optimized model optimizes the model again: captured graphs, stacks and
compiled kernels are not data, the model and the options are."""
from __future__ import annotations


def reoptimize(model, options: dict):
    """optimize(model, **options), looked up when a pickle is loaded.

    >>> from wavefront.models import MinGRU
    >>> type(reoptimize(MinGRU(2), {})).__name__
    'LoopLiftedModel'
    """
    import wavefront  # the public entry point, reached at load time (results pickle without importing the API)
    return wavefront.optimize(model, **options)
