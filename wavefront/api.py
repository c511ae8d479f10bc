"""The public entry points: optimize(), explain(), last_schedule()."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from wavefront.backends.inductor import compile_batched
from wavefront.backends.onnx.runtime_model import OnnxRuntimeModel
from wavefront.backends.step_timer import StepTimer
from wavefront.backends.torch_executor import TorchExecutor
from wavefront.call_gate import CallGate
from wavefront.contract.checks import VERIFY_RTOL, VerificationError
from wavefront.contract.segment import MemoryState, SegmentLMOutput, segment_bounds
from wavefront.export import export_onnx
from wavefront.passes.dependence import Verdict, analyse
from wavefront.passes.diagonal import diagonal_batching
from wavefront.reoptimize import reoptimize as _reoptimize
from wavefront.routes.kernels import ScanAcceleratedModel, scan_adapter_for
from wavefront.scheduler.adapters import AdapterRefused, bind_model, segment_adapter_for
from wavefront.scheduler.capture import capture
from wavefront.scheduler.capture_guard import CaptureGuard
from wavefront.scheduler.schedule import Schedule, build_schedule
from wavefront.scheduler.train_mode import eval_mode
from wavefront.stages import StageLog, debug_level
from wavefront.testing import rel_err
from wavefront.time_loops.model import LoopLiftedModel, model_time_loops

SCHEDULES = ("diagonal", "sequential")
BACKENDS = ("torch", "inductor", "aot_inductor", "onnxruntime")
COMPILING = ("inductor", "aot_inductor")


class OptimizedModel(nn.Module):
    """A model running under a wavefront schedule, with the model's forward(input_ids, memory=None)
    -> SegmentLMOutput. Build it with optimize().

    Nothing the user can change is held stale: before every call a CaptureGuard compares what the
    capture read (module, parameter and buffer objects, baked-in attributes, modes its traced code
    branches on) with the live model, and captures again when they differ (`refreshed` says why
    the last time); weights changed in place are read live anyway.
    """

    def __init__(self, model: nn.Module, schedule: str, backend: str, verify: bool):
        super().__init__()
        self.model = model
        self.schedule_kind, self.backend, self.verify = schedule, backend, verify
        self.last_schedule: Schedule | None = None
        self.compile_time_s: float | None = None  # inductor: time of the first (compiling) call
        self.refreshed = ""  # why the model was last captured again after optimize() ("" if never)
        self._verify_requested = verify
        self._unchanged_reason: str | None = None  # set when a changed model could no longer be proven
        object.__setattr__(self, "_gate", CallGate())
        self._build()

    def _build(self) -> None:
        """Capture the model and build its schedule's program (optimize(), and again after a change),
        each stage recorded in `stage_log` (wavefront.stages)."""
        log = StageLog()
        bound = log.run("bind", lambda: bind_model(self.model), lambda b: f"{b.family} (adapter {b.adapter}), "
                        f"segment_len {b.segment_len}, cell {type(b.cell).__name__}")
        rg = log.run("capture", lambda: capture(bound), lambda r: r.describe())
        log.run("analyse", lambda: analyse(rg))
        batched = None
        if self.schedule_kind == "diagonal":
            batched = log.run("rewrite", lambda: diagonal_batching(rg), lambda b: "diagonal batching:\n" + b.describe())
        if self.backend in COMPILING:
            if batched is None:
                raise ValueError(f"backend={self.backend!r} compiles the batched diagonal cell: use schedule='diagonal'")
            log.run("compile", lambda: compile_batched(batched, aot=self.backend == "aot_inductor"),
                    lambda _: f"{self.backend}: set up (compiled on the first call with each lane width)")
        executor = TorchExecutor(rg, batched)
        if batched is not None:  # the fast path is chosen here, on a synthetic input, not on a later call
            log.run("program", executor.build_program,
                    lambda p: executor.describe_program().strip())
        object.__setattr__(self, "bound", bound)  # plain references: the modules are the model's
        self.rg, self.batched, self.executor = rg, batched, executor
        self._guard = CaptureGuard(bound.source if bound.source is not None else self.model, rg.traced_modules,
                                   bound.volatile)
        self._schedules: dict[int, Schedule] = {}
        object.__setattr__(self, "stage_log", log)
        if self.backend in COMPILING and executor.program is not None:
            self.compile_time_s = log[-1].seconds  # the program's check compiled the cell at every lane width

    def _refresh_if_changed(self) -> None:
        """Capture again when the model changed, while no call is in flight (CallGate)."""
        why = self._guard.changed() if self._unchanged_reason is None else ""
        if why:
            with self._gate.exclusive():
                why = self._guard.changed()
                if why:
                    try:
                        self._build()
                    except AdapterRefused as e:  # the changed model is one wavefront cannot prove: run it as it is
                        self._unchanged_reason = f"after a change ({why}): {e}"
                        warnings.warn(f"{type(self.model).__name__} now runs unchanged: {e}", stacklevel=3)
                    self.refreshed = why
                    self.verify = self._verify_requested  # a new capture is verified again

    def forward(self, input_ids: torch.Tensor, memory: MemoryState | None = None) -> SegmentLMOutput:
        self._refresh_if_changed()
        if self._unchanged_reason is not None:
            return self.model(input_ids, memory) if memory is not None else self.model(input_ids)
        if self.verify:  # the verifying call may switch the model to eval mode: no other call meanwhile
            with self._gate.exclusive():
                return self._forward(input_ids, memory)
        with self._gate.shared():
            return self._forward(input_ids, memory)

    def _forward(self, input_ids, memory):
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] > 0:
            n_segments = len(segment_bounds(input_ids.shape[1], self.rg.segment_len))
        else:
            n_segments = 1  # let the executor's input check say what is wrong
        schedule = self._schedules.get(n_segments)
        if schedule is None:
            schedule = build_schedule(self.schedule_kind, self.rg.n_layers, n_segments)
            self._schedules = {n_segments: schedule}
        t0 = time.perf_counter()
        if debug_level() >= 2:
            out = self._run_timed(input_ids, schedule, memory)
        else:
            out = self.executor.run(input_ids, schedule, memory)
        if self.compile_time_s is None and self.backend in COMPILING:
            self.compile_time_s = time.perf_counter() - t0
        self.last_schedule = schedule
        if self.verify:
            self._check(input_ids, memory, schedule, out)
        return out

    def _run_timed(self, input_ids, schedule, memory):
        """WAVEFRONT_DEBUG=2: the call with every step timed, a summary printed on stderr."""
        import sys

        timer = StepTimer(input_ids.device)
        self.executor.step_timer = timer
        t0 = time.perf_counter()
        try:
            out = self.executor.run(input_ids, schedule, memory)
        finally:
            self.executor.step_timer = None
        steps = timer.durations(schedule.num_steps)
        slowest = max(range(len(steps)), key=steps.__getitem__)
        print(f"[wavefront] call: {schedule.kind} schedule, {schedule.num_steps} steps ({timer.path}) in "
              f"{1e3 * (time.perf_counter() - t0):.2f} ms; per step (ms): "
              + " ".join(f"{1e3 * d:.2f}" for d in steps) + f"; slowest step {slowest}", file=sys.stderr, flush=True)
        return out

    def _check(self, input_ids, memory, schedule, out):
        """verify=True: this call against the user's own forward (in eval mode when the model is
        training: dropout draws differ between any two runs)."""
        if memory is not None and not self.bound.reference_takes_memory:
            return  # the model's own forward starts fresh only: verify the first fresh call instead
        modules = list(self.model.modules())
        training = any(m.training for m in modules)
        with torch.no_grad(), eval_mode(modules if training else ()):
            if training:
                out = self.executor.run(input_ids, schedule, memory)
            ref = self.bound.reference(input_ids, memory)
        ref_logits = ref.logits if hasattr(ref, "logits") else ref
        ref_memory = ref.memory.leaves() if isinstance(getattr(ref, "memory", None), MemoryState) else ()
        errs = [rel_err(out.logits, ref_logits)] + [rel_err(a, b) for a, b in zip(out.memory.leaves(), ref_memory)]
        tol = VERIFY_RTOL.get(out.logits.dtype, 1e-4)
        if max(errs) > tol:
            raise VerificationError(f"{self.schedule_kind} schedule on backend {self.backend} differs from the model's "
                                    f"own forward: max relative error {max(errs):.3e} > {tol:.1e} "
                                    f"(logits {errs[0]:.3e}, memory {max(errs[1:], default=0.0):.3e})")
        self.verify = False  # verified on the first call, as documented

    def __reduce__(self):
        # Pickling (torch.save, copy.deepcopy) keeps the model and the options; loading optimizes
        # the restored model again: captured graphs, stacks and compiled kernels are not data.
        return (_reoptimize, (self.model, dict(schedule=self.schedule_kind, backend=self.backend, verify=self.verify)))

    def extra_repr(self) -> str:
        return f"schedule={self.schedule_kind!r}, backend={self.backend!r}, family={self.rg.family!r}"


class UnchangedModel(nn.Module):
    """What optimize() returns for a model it recognises but cannot run exactly: the model itself,
    called as it is; `reason` (and explain()) says why nothing was applied."""

    def __init__(self, model: nn.Module, reason: str):
        super().__init__()
        self.model, self.reason = model, reason

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"unchanged: {self.reason}"


def optimize(model: nn.Module, *, schedule: str = "diagonal", backend: str = "torch", verify: bool = False,
             kwargs: dict | None = None) -> nn.Module:
    """Capture `model`'s recurrence and run it under `schedule` ('diagonal' or 'sequential').

    The result has the model's forward(input_ids, memory=None) and outputs, carries memory across
    calls the same way, and shares the model's parameters (stacked in place for diagonal
    batching: state_dict keys and values unchanged). verify=True checks the first call against
    the model's own forward and raises VerificationError with the error if they differ.
    Illegal rewrites (diagonal on RMT) raise an error naming the offending edge. A model an
    adapter recognises but cannot prove it runs exactly comes back unchanged (UnchangedModel),
    with a warning and the reason in explain().
    backend="inductor" compiles the batched cell with torch.compile; backend="aot_inductor" compiles
    it ahead of time with AOTInductor (no per-call guard or Python wrapper: faster small steps;
    packages cached on disk), calls whose shapes the package was not built for run eager.
    backend="onnxruntime" exports the optimized model (cached on disk) and runs it in an
    onnxruntime session (`kwargs`: fixed keyword arguments of the model's call, e.g.
    {"use_cache": False} for Hugging Face models).
    An optimized model pickles (torch.save, copy.deepcopy): loading optimizes the model again.

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
    if schedule not in SCHEDULES:  # options are checked once, before any route is chosen
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {list(SCHEDULES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {list(BACKENDS)}")
    if backend == "onnxruntime":  # the torch-optimized model, exported and run by an onnxruntime session
        torch_model = optimize(model, schedule=schedule, backend="torch")
        return OnnxRuntimeModel(torch_model, kwargs=kwargs, verify=verify, export=export_onnx, reoptimize=_reoptimize,
                                segments=isinstance(torch_model, OptimizedModel))
    scan_adapter = scan_adapter_for(model)
    why = scan_adapter.check(model) if scan_adapter is not None else ""
    segment_model = scan_adapter is None and segment_adapter_for(model) is not None
    if backend in COMPILING and not segment_model:
        raise ValueError(f"backend={backend!r} compiles the batched layer cell of a segment-recurrent model; "
                         f"{type(model).__name__} is not one (its recurrences are time loops or scans): use "
                         "backend='torch' or backend='onnxruntime'")
    log = StageLog()
    if scan_adapter is not None and not why:  # a known model family with a native kernel (Mamba)
        accelerated = log.run("kernel substitution", lambda: ScanAcceleratedModel(model, scan_adapter, verify),
                              lambda m: scan_adapter.describe(model))
        object.__setattr__(accelerated, "stage_log", log)
        return accelerated
    if not segment_model:
        loops = log.run("find time loops", lambda: model_time_loops(model),  # Python time loops: lift the affine ones
                        lambda found: f"{len(found)} method(s) holding a time loop")
        if loops:
            lifted = log.run("lift loops", lambda: LoopLiftedModel(model, loops, verify),
                             lambda m: "\n".join(m.report()))
            object.__setattr__(lifted, "stage_log", log)
            if not lifted.lifted_any:
                warnings.warn(f"{type(model).__name__}: no time loop can run as a scan, the model runs as it is:\n"
                              + "\n".join(lifted.report()), stacklevel=2)
            return lifted
        if why:
            raise TypeError(f"cannot optimize {type(model).__name__}: {why}")
    try:
        return OptimizedModel(model, schedule, backend, verify)
    except AdapterRefused as e:
        warnings.warn(f"{type(model).__name__} runs unchanged: {e}", stacklevel=2)
        return UnchangedModel(model, str(e))


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
    if isinstance(model, OnnxRuntimeModel):
        e = explain(model.optimized, n_segments)
        e.backend = "onnxruntime; " + model.describe()
        return e
    no_segments = Verdict(False, "no segment recurrence: diagonal batching does not apply")
    if isinstance(model, UnchangedModel):
        return Explanation(type(model.model).__name__, "none", f"runs unchanged: {model.reason}", no_segments,
                           "unchanged", 0, None)
    inner = model.model if isinstance(model, (ScanAcceleratedModel, LoopLiftedModel)) else model
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
    if isinstance(model, OptimizedModel) and model._unchanged_reason is not None:
        return Explanation(type(model.model).__name__, "none", f"runs unchanged: {model._unchanged_reason}", no_segments,
                           "unchanged", 0, None)
    if isinstance(model, OptimizedModel):
        rg, last = model.rg, model.last_schedule
        n = n_segments if n_segments is not None else (last.n_segments if last else None)
        batching = model.batched.describe() if model.batched is not None else ""
        if model.batched is not None:
            batching += "\n" + model.executor.describe_program()
        structure = rg.describe() + (f"\n  captured again after optimize(): {model.refreshed}" if model.refreshed else "")
        return Explanation(rg.family, rg.adapter, structure, analyse(rg), model.schedule_kind, rg.n_layers, n,
                           batching, model.backend)
    try:
        rg = capture(model)
    except AdapterRefused as e:
        return Explanation(type(model).__name__, "none", f"runs unchanged: {e}", no_segments, "unchanged", 0, None)
    verdict = analyse(rg)
    return Explanation(rg.family, rg.adapter, rg.describe(), verdict,
                       "diagonal" if verdict.diagonal_legal else "sequential", rg.n_layers, n_segments)
