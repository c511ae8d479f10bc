"""wavefront: a compiler-style scheduling toolkit for recurrent sequence models."""
__version__ = "0.1.0"

from . import models  # noqa: E402
