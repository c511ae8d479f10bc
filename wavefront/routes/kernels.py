"""The kernel route: models whose code calls transformers' kernel seam run with wavefront.kernels
in place of the seam's PyTorch fallbacks.

Every seam function the model's own classes call (wavefront.routes.kernel_seam finds them by the
decorator in the modeling file's source) and for which wavefront has a kernel of that API is
swapped, in its module's namespace, for the duration of each call of the optimized model
(restored afterwards, also on error). The model's own forward runs, with its weights, outputs and
caches; the first call can be verified against it unswapped. Arguments reach the kernel as the
seam passes them to the package it stands for (keyword arguments the kernel does not take are
dropped, as transformers drops them). A seam a package already serves, or one wavefront has no
kernel for, keeps running what it runs; an input a kernel does not run (an activation other than
silu, packed sequences) runs the model's own function. The route applies when at least one
substituted kernel carries a recurrence. The swap is of module globals: while an optimized model
runs, any other model of the same modeling module running in another thread sees wavefront's
kernels too (the same results, to rounding).
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn

from wavefront.kernels import KERNELS, RECURRENT, how
from wavefront.kernels.unsupported import Unsupported
from wavefront.routes.base import Optimized
from wavefront.routes.explanation import NO_SEGMENTS, Explanation
from wavefront.routes.kernel_seam import Seam, find_seams


def _seam_call(kernel):
    """The kernel called the way transformers' seam calls a package's function."""
    params = tuple(inspect.signature(kernel).parameters)

    @functools.wraps(kernel)
    def call(*args, **kwargs):
        return kernel(*args, **{k: v for k, v in kwargs.items() if k in params})
    return call


_CALLS = {api: _seam_call(fn) for api, fn in KERNELS.items()}


def substitutable(seams: list[Seam]) -> list[Seam]:
    """The seams wavefront fills: a kernel of that API exists and no package serves it."""
    return [s for s in seams if s.api in KERNELS and s.served_by is None]


def _filled(seam: Seam):
    """The seam's function while swapped: wavefront's kernel, or the model's own function for an
    input the kernel does not run (it raises Unsupported before computing or writing anything)."""
    kernel = _CALLS[seam.api]

    @functools.wraps(seam.original)
    def call(*args, **kwargs):
        try:
            return kernel(*args, **kwargs)
        except Unsupported:
            return seam.original(*args, **kwargs)
    return call


@contextlib.contextmanager
def swapped(seams: list[Seam]):
    """Each seam's global replaced by wavefront's kernel while the block runs; a global the user
    replaced since optimize() is left alone."""
    done = []
    try:
        for s in seams:
            if getattr(s.namespace, s.name, None) is s.original:
                setattr(s.namespace, s.name, _filled(s))
                done.append(s)
        yield
    finally:
        for s in done:
            setattr(s.namespace, s.name, s.original)


def _why_not(seams: list[Seam]) -> str:
    kept = [f"{s.name} ({s.api})" for s in seams]
    served = sorted({s.served_by for s in seams if s.served_by})
    if served:
        return f"its recurrent kernels are served by {', '.join(served)} already ({', '.join(kept)})"
    return (f"the kernel-seam functions it calls are not recurrences wavefront scans ({', '.join(kept)}: "
            "short convolutions or fused blocks whose PyTorch fallback runs the model's own path)")


def describe(model: nn.Module, seams: list[Seam]) -> str:
    """What the route found: the seams per calling class, and what runs each."""
    filled = substitutable(seams)
    counts = {}
    for m in model.modules():
        counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    callers = dict.fromkeys(c for s in seams for c in s.callers)
    lines = [f"{type(model).__name__}: calls transformers' kernel seam from "
             + ", ".join(f"{c} (x{counts.get(c, 0)})" for c in callers)]
    for s in seams:
        if s in filled:
            lines.append(f"  {s.name} [{s.api}]: runs as wavefront.kernels.{s.api} ({how(s.api)})")
        else:
            lines.append(f"  {s.name} [{s.api}]: kept ("
                         + (f"served by {s.served_by})" if s.served_by else "no wavefront kernel of that API)"))
    return "\n".join(lines)


class KernelSubstitutedModel(Optimized):
    """A model whose kernel-seam functions run as wavefront's kernels; same forward signature and outputs."""

    route = "kernel substitution"
    precision = torch.float32  # transformers' fallbacks compute in float32 even for float64 models

    def __init__(self, model: nn.Module, seams: list[Seam], options: dict, verify: bool = False):
        super().__init__(model, options, verify)
        object.__setattr__(self, "seams", seams)  # module namespaces and functions: not submodules, not state

    def running(self):
        return swapped(substitutable(self.seams))

    def run(self, *args, **kwargs):
        with self.running():
            return self.model(*args, **kwargs)

    def describe_route(self) -> str:
        return "wavefront's kernels at transformers' kernel seam"

    def rewrites(self) -> list[str]:
        return [describe(self.model, self.seams)]

    def export_kind(self) -> str:
        return "kernel seam"

    def explain(self, n_segments: int | None = None) -> Explanation:
        return preview(self.model, n_segments)


def recognise(model: nn.Module) -> str | None:
    """'' when wavefront fills a recurrent kernel of `model`'s seam, the reason when the model
    calls the seam but nothing recurrent can be filled, None when it does not call the seam."""
    seams = find_seams(model)
    if not seams:
        return None
    return "" if any(s.api in RECURRENT for s in substitutable(seams)) else _why_not(seams)


def build(model: nn.Module, options: dict, verify: bool, log) -> KernelSubstitutedModel:
    seams = find_seams(model)
    return log.run("kernel substitution", lambda: KernelSubstitutedModel(model, seams, options, verify),
                   lambda m: describe(model, seams))


def preview(model: nn.Module, n_segments: int | None = None) -> Explanation:
    seams = find_seams(model)
    why = recognise(model)
    return Explanation(type(model).__name__, "kernel seam", describe(model, seams), NO_SEGMENTS,
                       f"unchanged ({why})" if why else "kernels substituted", 0, None)


__all__ = ["KernelSubstitutedModel", "build", "describe", "preview", "recognise", "substitutable", "swapped"]
