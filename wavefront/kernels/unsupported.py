"""Unsupported: an input the external package's function takes but wavefront's kernel does not.

Raised before anything is computed or written, so that the kernel seam can run the model's own
function instead (wavefront.routes.kernels): the library user gets the error, the optimized model
the original result.
"""
from __future__ import annotations


class Unsupported(ValueError):
    """This input is valid for the package's function, but wavefront's kernel does not run it.

    >>> issubclass(Unsupported, ValueError)
    True
    """


__all__ = ["Unsupported"]
