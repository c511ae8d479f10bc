"""Every product of the pipeline, kept and printable: wavefront.stages(optimized).

optimize() records each stage as it runs it (bind, capture, analyse, rewrite, compile, plan and
program for a segment model; the time loops or the kernel substitution for the others; the ONNX
export under backend="onnxruntime"), with the time it took and the product itself (the
RecurrenceGraph, the Verdict, the BatchedRecurrence, the SegmentProgram...), as Lightning
Thunder keeps its traces. WAVEFRONT_DEBUG=1 prints the stages as they run (on stderr);
WAVEFRONT_DEBUG=2 also prints every call's per-step timings.
"""
from __future__ import annotations

import os
import sys
import textwrap
import time
from dataclasses import dataclass


def debug_level() -> int:
    """WAVEFRONT_DEBUG as an int (0 when unset; a value that is not a number is an error)."""
    raw = os.environ.get("WAVEFRONT_DEBUG", "").strip()
    if not raw:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"WAVEFRONT_DEBUG must be 0, 1 or 2, got {raw!r}") from None


@dataclass(frozen=True)
class Stage:
    """One stage: its name, what it produced, how long it took and a readable summary."""

    name: str
    product: object
    seconds: float
    text: str

    def __str__(self) -> str:
        body = textwrap.indent(self.text, "    ") if self.text else ""
        return f"{self.name} ({1e3 * self.seconds:.1f} ms)" + (f"\n{body}" if body else "")


class StageLog(list):
    """The stages of one optimized model, in the order they ran."""

    def run(self, name: str, fn, describe=str):
        """Run fn(), record its product as stage `name` (summary: describe(product)) and return it."""
        t0 = time.perf_counter()
        product = fn()
        self.add(name, product, time.perf_counter() - t0, describe(product))
        return product

    def add(self, name: str, product, seconds: float, text: str) -> None:
        stage = Stage(name, product, seconds, text)
        self.append(stage)
        if debug_level() >= 1:
            print(f"[wavefront] {stage}", file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return "\n".join(str(s) for s in self)


def stages(optimized) -> StageLog:
    """The stages optimize() ran for `optimized`, each with its product, time and summary; the
    schedule of the last call and, under backend="onnxruntime", the export come last.

    >>> import wavefront
    >>> from wavefront.models import ARMT, ARMTConfig
    >>> fast = wavefront.optimize(ARMT(ARMTConfig(n_layers=2, segment_len=8)))
    >>> [s.name for s in wavefront.stages(fast)]
    ['bind', 'capture', 'analyse', 'rewrite', 'program']
    """
    if not callable(getattr(optimized, "stages", None)) or not hasattr(optimized, "stage_log"):
        raise TypeError(f"stages() shows what optimize() did; got {type(optimized).__name__}: optimize the model first")
    return StageLog(optimized.stages())


__all__ = ["Stage", "StageLog", "debug_level", "stages"]
