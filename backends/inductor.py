"""backend="inductor": torch.compile the lane-folded batched cells.

Lane counts change through warm-up and drain (1, 2, ..., L lanes) and the last segment may be
short, so the folded graph is compiled with dynamic shapes: one compile serves every width and
length (torch specialises size 1, which is why single-lane calls stay eager; parameter slices
starting at layer 0 and later ones compile once each). Kinds batched by vmap stay eager, and so
does every call made while autograd records: the compiled cells serve inference. Set
TORCHINDUCTOR_CACHE_DIR to a persistent folder to keep compiled kernels across processes: a cold
compile of a small layer takes tens of seconds on a CPU.
"""
from __future__ import annotations

import torch
from wavefront.backends.aot_cell import AotFoldedCell


def compile_batched(batched, *, aot: bool = False, **compile_kwargs) -> None:
    """Compile every lane-folded cell of a BatchedRecurrence in place: with torch.compile, or
    with aot=True ahead of time by AOTInductor (backends/aot_cell.py: no per-call guard or
    Python wrapper; built on the first batched call, cached on disk)."""
    opts = dict(dynamic=True, fullgraph=True)
    opts.update(compile_kwargs)
    for group in batched.groups:
        cell = group.cell
        if getattr(cell, "mode", None) == "fold":
            if aot:
                cell.compiled = AotFoldedCell(cell.folded, compile_kwargs)
            else:
                cell.compiled = torch.compile(cell.folded, **opts)
        else:
            group.reason = (group.reason + "; " if group.reason else "") + "not compiled: inductor compiles lane-folded cells"
