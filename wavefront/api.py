"""The public entry points: optimize(), explain(), last_schedule()."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from wavefront.models.segment import MemoryState, SegmentLMOutput, SegmentRecurrentLM, segment_bounds
from wavefront.passes.dependence import Verdict, analyse
from wavefront.scheduler.adapters import bind_model, segment_adapter_for
from wavefront.scheduler.capture import capture
from wavefront.scheduler.recurrence_graph import RecurrenceGraph
from wavefront.scheduler.schedule import Schedule, build_schedule
from wavefront.verification import VERIFY_RTOL, VerificationError

SCHEDULES = ("diagonal", "sequential")
BACKENDS = ("torch", "inductor", "aot_inductor", "onnxruntime")
COMPILING = ("inductor", "aot_inductor")


class OptimizedModel(nn.Module):
    """A model running under a wavefront schedule, with the model's forward(input_ids, memory=None)
    -> SegmentLMOutput. Build it with optimize()."""

    def __init__(self, model: nn.Module, rg: RecurrenceGraph, schedule: str, backend: str, verify: bool,
                 batched=None, executor=None, reference=None):
        super().__init__()
        self.model = model
        self.rg, self.schedule_kind, self.backend, self.verify = rg, schedule, backend, verify
        self.batched, self.executor = batched, executor
        object.__setattr__(self, "reference", reference)  # sequential reference over the same modules
        self.last_schedule: Schedule | None = None
        self.compile_time_s: float | None = None  # inductor: time of the first (compiling) call
        self._schedules: dict[int, Schedule] = {}
        self._placement = self._current_placement()

    def _current_placement(self):
        p = next(self.rg.cell.parameters())
        return p.dtype, p.device

    def _recapture_if_moved(self) -> None:
        """Captured graphs hold their own references to buffers (FX copies them), so after
        model.to(dtype/device) the model is captured and batched again rather than run stale."""
        if self._current_placement() == self._placement:
            return
        fresh = optimize(self.model, schedule=self.schedule_kind, backend=self.backend, verify=False)
        self.rg, self.batched, self.executor = fresh.rg, fresh.batched, fresh.executor
        object.__setattr__(self, "reference", fresh.reference)
        self._schedules, self._placement = {}, self._current_placement()

    def forward(self, input_ids: torch.Tensor, memory: MemoryState | None = None) -> SegmentLMOutput:
        self._recapture_if_moved()
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] > 0:
            n_segments = len(segment_bounds(input_ids.shape[1], self.rg.segment_len))
        else:
            n_segments = 1  # let the executor's input check say what is wrong
        if n_segments not in self._schedules:
            self._schedules = {n_segments: build_schedule(self.schedule_kind, self.rg.n_layers, n_segments)}
        schedule = self._schedules[n_segments]
        t0 = time.perf_counter()
        out = self.executor.run(input_ids, schedule, memory)
        if self.compile_time_s is None and self.backend in COMPILING:
            self.compile_time_s = time.perf_counter() - t0
        self.last_schedule = schedule
        if self.verify:
            self._check(input_ids, memory, out)
        return out

    def _check(self, input_ids, memory, out):
        from wavefront.testing import rel_err
        with torch.no_grad():
            ref = self.reference(input_ids, memory)
        errs = [rel_err(out.logits, ref.logits)] + [rel_err(a, b) for a, b in zip(out.memory.tensors, ref.memory.tensors)]
        tol = VERIFY_RTOL.get(out.logits.dtype, 1e-4)
        if max(errs) > tol:
            raise VerificationError(f"{self.schedule_kind} schedule on backend {self.backend} differs from the sequential "
                                    f"reference: max relative error {max(errs):.3e} > {tol:.1e} "
                                    f"(logits {errs[0]:.3e}, memory {max(errs[1:], default=0.0):.3e})")
        self.verify = False  # verified on the first call, as documented

    def extra_repr(self) -> str:
        return f"schedule={self.schedule_kind!r}, backend={self.backend!r}, family={self.rg.family!r}"


def optimize(model: nn.Module, *, schedule: str = "diagonal", backend: str = "torch", verify: bool = False,
             kwargs: dict | None = None) -> nn.Module:
    """Capture `model`'s recurrence and run it under `schedule` ('diagonal' or 'sequential').

    The result has the model's forward(input_ids, memory=None) and outputs, carries memory across
    calls the same way, and shares the model's parameters (stacked in place for diagonal
    batching: state_dict keys and values unchanged). verify=True checks the first call against
    the sequential reference and raises VerificationError with the error if they differ.
    Illegal rewrites (diagonal on RMT) raise an error naming the offending edge.
    backend="inductor" compiles the batched cell with torch.compile; backend="aot_inductor" compiles
    it ahead of time with AOTInductor (no per-call guard or Python wrapper: faster small steps;
    packages cached on disk), calls whose shapes the package was not built for run eager.
    backend="onnxruntime" exports the optimized model (cached on disk) and runs it in an
    onnxruntime session (`kwargs`: fixed keyword arguments of the model's call, e.g.
    {"use_cache": False} for Hugging Face models).

    >>> from wavefront.models import ARMT, ARMTConfig
    >>> model = ARMT(ARMTConfig(n_layers=3, segment_len=8)).eval()
    >>> fast = optimize(model, verify=True)
    >>> out = fast(torch.randint(0, 256, (1, 40)))
    >>> last_schedule(fast).num_steps   # L + S - 1 = 3 + 5 - 1
    7
    """
    if backend == "onnxruntime":  # the torch-optimized model, exported and run by an onnxruntime session
        from wavefront.backends.onnxruntime_backend import OnnxRuntimeModel
        return OnnxRuntimeModel(optimize(model, schedule=schedule, backend="torch"), kwargs=kwargs, verify=verify)
    from wavefront.scheduler.scan_adapters import ScanAcceleratedModel, scan_adapter_for
    scan_adapter = scan_adapter_for(model)
    why = scan_adapter.check(model) if scan_adapter is not None else ""
    if scan_adapter is not None and not why:  # a known model family with a native kernel (Mamba)
        return ScanAcceleratedModel(model, scan_adapter, verify)
    if scan_adapter is not None or segment_adapter_for(model) is None:
        from wavefront.loop_model import LoopLiftedModel, model_time_loops
        loops = model_time_loops(model)  # Python time loops: lift the affine ones into scans
        if loops:
            lifted = LoopLiftedModel(model, loops, verify)
            if not lifted.lifted_any:
                warnings.warn(f"{type(model).__name__}: no time loop can run as a scan, the model runs as it is:\n"
                              + "\n".join(lifted.report()), stacklevel=2)
            return lifted
        if why:
            raise TypeError(f"cannot optimize {type(model).__name__}: {why}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {list(SCHEDULES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {list(BACKENDS)}")
    from wavefront.backends.torch_executor import TorchExecutor
    from wavefront.passes.diagonal import diagonal_batching
    bound = bind_model(model)
    rg = capture(bound)
    batched = diagonal_batching(rg) if schedule == "diagonal" else None
    if backend in COMPILING:
        from wavefront.backends.inductor import compile_batched
        if batched is None:
            raise ValueError(f"backend={backend!r} compiles the batched diagonal cell: use schedule='diagonal'")
        compile_batched(batched, aot=backend == "aot_inductor")
    reference = SegmentRecurrentLM(bound.cell, bound.segment_len)
    return OptimizedModel(model, rg, schedule, backend, verify, batched, TorchExecutor(rg, batched), reference)


def last_schedule(optimized: OptimizedModel) -> Schedule | None:
    """The Schedule the last call of an optimized model executed (None before the first call)."""
    if not isinstance(optimized, OptimizedModel):
        raise TypeError(f"last_schedule expects what optimize() returned, got {type(optimized).__name__}")
    return optimized.last_schedule


@dataclass
class Explanation:
    """What wavefront found in a model, what it would apply or refuses, and why."""

    family: str
    adapter: str
    structure: str
    verdict: Verdict
    schedule: str
    n_layers: int
    n_segments: int | None
    batching: str = ""
    backend: str = ""

    @property
    def steps(self) -> dict[str, int] | None:
        if self.n_segments is None:
            return None
        L, S = self.n_layers, self.n_segments
        out = {"sequential": L * S}
        if self.verdict.diagonal_legal:
            out["diagonal"] = L + S - 1
        return out

    def __str__(self) -> str:
        lines = ["captured: " + self.structure, str(self.verdict), f"schedule: {self.schedule}"
                 + (f" on backend {self.backend}" if self.backend else "")]
        if self.steps:
            lines.append(f"steps for {self.n_segments} segments: "
                         + ", ".join(f"{k} {v}" for k, v in self.steps.items()))
        if self.batching:
            lines.append("batched calls:\n" + self.batching)
        return "\n".join(lines)


def explain(model: nn.Module, n_segments: int | None = None) -> Explanation:
    """Report the captured structure, the diagonal-batching verdict, the chosen schedule and the
    step counts (for `n_segments`, or the last call's of an optimized model). Never raises for
    an unsupported pattern it can describe.

    >>> from wavefront.models import RMT, RMTConfig
    >>> print(explain(RMT(RMTConfig(n_layers=2)), n_segments=4).steps)
    {'sequential': 8}
    """
    from wavefront.backends.onnxruntime_backend import OnnxRuntimeModel
    if isinstance(model, OnnxRuntimeModel):
        e = explain(model.optimized, n_segments)
        e.backend = "onnxruntime; " + model.describe()
        return e
    from wavefront.loop_model import LoopLiftedModel, model_time_loops
    from wavefront.scheduler.scan_adapters import ScanAcceleratedModel, scan_adapter_for
    inner = model.model if isinstance(model, (ScanAcceleratedModel, LoopLiftedModel)) else model
    no_segments = Verdict(False, "no segment recurrence: diagonal batching does not apply")
    scan_adapter = scan_adapter_for(inner)
    why = scan_adapter.check(inner) if scan_adapter is not None else ""
    if scan_adapter is not None and not why:
        return Explanation(type(inner).__name__, scan_adapter.name, scan_adapter.describe(inner), no_segments,
                           "native scan", 0, None)
    if scan_adapter is not None or (segment_adapter_for(inner) is None and not isinstance(model, OptimizedModel)):
        lifted = model if isinstance(model, LoopLiftedModel) else None
        if lifted is None:
            loops = model_time_loops(inner)
            lifted = LoopLiftedModel(inner, loops) if loops else None
        if lifted is not None:
            return Explanation(type(inner).__name__, "time-loops", "Python time loops:\n  " + "\n  ".join(lifted.report()),
                               no_segments, "loops as scans" if lifted.lifted_any else "unchanged", 0, None)
        if why:
            return Explanation(type(inner).__name__, scan_adapter.name, scan_adapter.describe(inner), no_segments,
                               f"unchanged ({why})", 0, None)
    if isinstance(model, OptimizedModel):
        rg, last = model.rg, model.last_schedule
        n = n_segments if n_segments is not None else (last.n_segments if last else None)
        batching = model.batched.describe() if model.batched is not None else ""
        if model.batched is not None:
            batching += "\n" + model.executor.describe_program()
        return Explanation(rg.family, rg.adapter, rg.describe(), analyse(rg), model.schedule_kind, rg.n_layers, n,
                           batching, model.backend)
    rg = capture(model)
    verdict = analyse(rg)
    return Explanation(rg.family, rg.adapter, rg.describe(), verdict,
                       "diagonal" if verdict.diagonal_legal else "sequential", rg.n_layers, n_segments)
