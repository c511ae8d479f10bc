"""The public entry points: optimize(), explain(), last_schedule(). Routing lives in
wavefront/routes/registry.py; every result is an Optimized (wavefront/routes/base.py)."""
from __future__ import annotations

from torch import nn

from wavefront.contract.checks import VerificationError
from wavefront.routes import registry
from wavefront.routes.base import Optimized
from wavefront.routes.explanation import Explanation
from wavefront.routes.onnxruntime import OnnxRuntimeModel
from wavefront.routes.segments import OptimizedModel
from wavefront.routes.unchanged import UnchangedModel
from wavefront.scheduler.schedule import Schedule

SCHEDULES, BACKENDS = registry.SCHEDULES, registry.BACKENDS


def optimize(model: nn.Module, *, schedule: str = "diagonal", backend: str = "torch", verify: bool = False,
             kwargs: dict | None = None) -> Optimized:
    """Find `model`'s recurrence and run it faster, exactly: a segment recurrence under `schedule`
    ('diagonal' or 'sequential'), Python time loops as scans, known loop functions as kernels.

    The result (an Optimized) has the model's forward and outputs, carries memory across calls
    the same way, and shares the model's parameters (stacked in place for diagonal batching:
    state_dict keys and values unchanged). verify=True checks the first call against the model's
    own forward and raises VerificationError with the error if they differ.
    Illegal rewrites (diagonal on RMT) raise an error naming the offending edge. A model no route
    applies to, or that an adapter recognises but cannot prove it runs exactly, comes back
    unchanged (UnchangedModel), with a warning and the reason in explain().
    backend="inductor" compiles the batched cell with torch.compile; backend="aot_inductor" compiles
    it ahead of time with AOTInductor (no per-call guard or Python wrapper: faster small steps;
    packages cached on disk), calls whose shapes the package was not built for run eager.
    backend="onnxruntime" exports the optimized model (cached on disk) and runs it in an
    onnxruntime session (`kwargs`: fixed keyword arguments of the model's call, e.g.
    {"use_cache": False} for Hugging Face models).
    An optimized model pickles (torch.save, copy.deepcopy): loading optimizes the model again.

    >>> import torch
    >>> from wavefront.models import ARMT, ARMTConfig
    >>> model = ARMT(ARMTConfig(n_layers=3, segment_len=8)).eval()
    >>> fast = optimize(model, verify=True)
    >>> out = fast(torch.randint(0, 256, (1, 40)))
    >>> last_schedule(fast).num_steps   # L + S - 1 = 3 + 5 - 1
    7
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes a torch.nn.Module (the model to run faster), got {type(model).__name__} "
                        f"{model!r:.60}")
    registry.check_options(schedule, backend)
    return registry.build(model, schedule, backend, verify, kwargs)


def last_schedule(optimized: OptimizedModel) -> Schedule | None:
    """The Schedule the last call of an optimized segment model executed (None before the first call)."""
    inner = optimized.optimized if isinstance(optimized, OnnxRuntimeModel) else optimized
    if not isinstance(inner, OptimizedModel):
        raise TypeError(f"last_schedule expects what optimize() returned for a segment model, got "
                        f"{type(optimized).__name__}")
    return inner.last_schedule


def explain(model: nn.Module, n_segments: int | None = None) -> Explanation:
    """Report what wavefront found in `model` (optimized or not) and what runs as what: the
    captured structure, the diagonal-batching verdict, the chosen schedule and the step counts
    (for `n_segments`, or the last call's of an optimized model). Never raises for a model it
    does not recognise: it says why nothing applies.

    >>> from wavefront.models import RMT, RMTConfig
    >>> print(explain(RMT(RMTConfig(n_layers=2)), n_segments=4).steps)
    {'sequential': 8}
    """
    if isinstance(model, Optimized):
        return model.explain(n_segments)
    return registry.preview(model, n_segments)


__all__ = ["BACKENDS", "Explanation", "OnnxRuntimeModel", "Optimized", "OptimizedModel", "SCHEDULES",
           "UnchangedModel", "VerificationError", "explain", "last_schedule", "optimize"]
