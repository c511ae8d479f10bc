"""Analysis and rewrite passes: wavefront.passes."""
from wavefront.passes.dependence import CellGrid, Verdict, analyse, build_grid

__all__ = ["CellGrid", "Verdict", "analyse", "build_grid"]
