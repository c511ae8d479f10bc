"""The routes optimize() chooses among, in order, and the one place that chooses.

A route recognises a model by its structure (a segment cell an adapter builds, Python time loops
in its methods, a kernel seam it can fill), never by refusing what it does not know: the first
route that applies builds the result, a route that recognises the model but cannot apply says
why and the next one is tried, and a model no route applies to runs unchanged with every reason
(explain() shows them). backend="onnxruntime" runs what the torch route built in onnxruntime.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn

import wavefront.routes.kernels as kernels
import wavefront.routes.onnxruntime as onnxruntime
import wavefront.routes.segments as segments
import wavefront.time_loops.model as time_loops
from wavefront.routes.base import Optimized
from wavefront.routes.explanation import Explanation, unchanged
from wavefront.routes.unchanged import UnchangedModel
from wavefront.scheduler.adapters import AdapterRefused, adapter_names
from wavefront.stages import StageLog

SCHEDULES = ("diagonal", "sequential")
BACKENDS = ("torch", "inductor", "aot_inductor", "onnxruntime")


@dataclass(frozen=True)
class Route:
    """One way to run a model faster: how it recognises a model, what it builds, and what
    explain() says before anything is built.

    recognise(model) -> None (not this route's kind of model), "" (applies) or the reason it
    cannot; build(model, options, verify, log) -> Optimized; preview(model, n_segments) -> Explanation;
    looks_for(model): what it found missing in a model it does not recognise.
    """

    name: str
    backends: tuple[str, ...]
    recognise: Callable[[nn.Module], str | None]
    build: Callable
    preview: Callable[[nn.Module, int | None], Explanation]
    looks_for: Callable[[nn.Module], str]


def _build_segments(model, options, verify, log):
    return segments.OptimizedModel(model, options["schedule"], options["backend"], verify)


def _no_segment_adapter(model: nn.Module) -> str:
    return (f"no segment adapter recognises {type(model).__name__} (tried: {', '.join(adapter_names())}; build it from "
            "wavefront.models or register_adapter() one)")


ROUTES = (
    Route("kernel substitution", ("torch", "onnxruntime"), kernels.recognise, kernels.build, kernels.preview,
          lambda model: "it calls no function of transformers' kernel seam"),
    Route("segment recurrence", BACKENDS, segments.recognise, _build_segments, segments.preview, _no_segment_adapter),
    Route("time loops", ("torch", "onnxruntime"), time_loops.recognise, time_loops.build, time_loops.preview,
          lambda model: "no method of its modules holds a Python time loop"),
)


def check_options(schedule: str, backend: str) -> None:
    """Refuse unknown options once, before any route is chosen."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {list(SCHEDULES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {list(BACKENDS)}")


def choose_route(model: nn.Module) -> tuple[Route | None, list[tuple[Route, str]]]:
    """(the first route that applies to `model` or None, (route, why not) for each route that
    recognised it but could not apply)."""
    refused = []
    for route in ROUTES:
        why = route.recognise(model)
        if why == "":
            return route, refused
        if why is not None:
            refused.append((route, why))
    return None, refused


def _nothing_applies(model: nn.Module, refused: list[tuple[Route, str]]) -> str:
    """Per route, why it did not apply: its own reason if it recognised the model, else what it looked for."""
    why = dict((route.name, f"{route.name}: {reason}") for route, reason in refused)
    return "; ".join(why.get(route.name) or route.looks_for(model) for route in ROUTES)


def build(model: nn.Module, schedule: str, backend: str, verify: bool, kwargs: dict | None) -> Optimized:
    """The result of optimize(model, ...) (see wavefront.optimize)."""
    options = {"schedule": schedule, "backend": backend} | ({"kwargs": dict(kwargs)} if kwargs else {})
    if backend == "onnxruntime":  # the torch route's result, exported and run by an onnxruntime session
        torch_model = build(model, schedule, "torch", False, None)
        result = onnxruntime.build(torch_model, options, verify, kwargs)
        object.__setattr__(result, "stage_log", StageLog(torch_model.stage_log))
        return result
    route, reasons = choose_route(model)
    if route is not None and backend not in route.backends:
        raise ValueError(f"backend={backend!r} does not apply to {type(model).__name__}: it runs by {route.name}, "
                         f"which takes backend {' or '.join(repr(b) for b in route.backends)}"
                         + (" (the compiling backends compile the batched layer cell of a segment-recurrent model)"
                            if backend in segments.COMPILING else ""))
    if route is None:
        reason = _nothing_applies(model, reasons)
        warnings.warn(f"{type(model).__name__} runs unchanged: {reason}", stacklevel=3)
        return UnchangedModel(model, reason, options)
    log = StageLog()
    try:
        result = route.build(model, options, verify, log)
    except AdapterRefused as e:  # recognised, but the adapter cannot prove it runs the model exactly
        warnings.warn(f"{type(model).__name__} runs unchanged: {e}", stacklevel=3)
        return UnchangedModel(model, str(e), options)
    if not result.stage_log:
        object.__setattr__(result, "stage_log", log)
    return result


def preview(model: nn.Module, n_segments: int | None) -> Explanation:
    """explain() of a model not optimized: what the route that applies would find, or why none does."""
    route, reasons = choose_route(model)
    if route is None:  # the account optimize() would give the UnchangedModel
        return unchanged(type(model).__name__, _nothing_applies(model, reasons))
    return route.preview(model, n_segments)


__all__ = ["BACKENDS", "ROUTES", "Route", "SCHEDULES", "build", "check_options", "choose_route", "preview"]
