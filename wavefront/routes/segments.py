"""The segment-recurrence route: a layer stack run over segments, under a schedule.

bind -> capture -> analyse -> rewrite (diagonal batching) -> compile (inductor backends) ->
program (the one-program form, chosen on a synthetic input), each recorded as a stage.
"""
from __future__ import annotations

import sys
import time
import warnings

import torch
from torch import nn

from wavefront.backends.inductor import compile_batched
from wavefront.backends.onnx.decode_export import export_decode
from wavefront.backends.onnx.segments import export_segments
from wavefront.backends.step_timer import StepTimer
from wavefront.backends.torch_executor import TorchExecutor
from wavefront.contract.segment import (
    MemoryState,
    SegmentLMOutput,
    segment_bounds,
    with_hf_conventions,
)
from wavefront.generation import segment_generate
from wavefront.kv_decode import CachedSegmentDecoder
from wavefront.passes.dependence import analyse
from wavefront.passes.diagonal import diagonal_batching
from wavefront.routes.base import SKIP, Optimized
from wavefront.routes.explanation import Explanation, unchanged
from wavefront.scheduler.adapters import AdapterRefused, bind_model, segment_adapter_for
from wavefront.scheduler.capture import capture
from wavefront.scheduler.capture_guard import CaptureGuard
from wavefront.scheduler.schedule import Schedule, build_schedule
from wavefront.stages import Stage, StageLog, debug_level

COMPILING = ("inductor", "aot_inductor")


class OptimizedModel(Optimized):
    """A segment model running under a wavefront schedule, with the model's
    forward(input_ids, memory=None) -> SegmentLMOutput. Build it with optimize().

    Nothing the user can change is held stale: before every call a CaptureGuard compares what the
    capture read (module, parameter and buffer objects, baked-in attributes, modes its traced code
    branches on) with the live model, and captures again when they differ (`refreshed` says why
    the last time); weights changed in place are read live anyway.
    """

    route = "segment recurrence"

    def __init__(self, model: nn.Module, schedule: str, backend: str, verify: bool):
        super().__init__(model, {"schedule": schedule, "backend": backend}, verify)
        self.schedule_kind, self.backend = schedule, backend
        self.last_schedule: Schedule | None = None
        self.compile_time_s: float | None = None  # inductor: time of the first (compiling) call
        self.refreshed = ""  # why the model was last captured again after optimize() ("" if never)
        self._unchanged_reason: str | None = None  # set when a changed model could no longer be proven
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
            log.run("program", executor.build_program, lambda p: executor.describe_program().strip())
        object.__setattr__(self, "bound", bound)  # plain references: the modules are the model's
        self.rg, self.batched, self.executor = rg, batched, executor
        self._guard = CaptureGuard(bound.source if bound.source is not None else self.model, rg.traced_modules,
                                   bound.volatile)
        self._schedules: dict[int, Schedule] = {}
        self._decoder = CachedSegmentDecoder(bound.cell, rg.segment_len)  # generate(): checked on first use
        object.__setattr__(self, "stage_log", log)
        if self.backend in COMPILING and executor.program is not None:
            self.compile_time_s = log[-1].seconds  # the program's check compiled the cell at every lane width

    def before_call(self) -> None:
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
                        warnings.warn(f"{type(self.model).__name__} now runs unchanged: {e}", stacklevel=4)
                    self.refreshed = why
                    self.verify = self._verify_requested  # a new capture is verified again

    def forward(self, input_ids: torch.Tensor, memory: MemoryState | None = None, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> SegmentLMOutput:
        """Logits and memory as the model's forward gives them, with Hugging Face's conventions:
        `labels` add the causal-LM loss (`.loss`, transformers' formula), an `attention_mask` of
        ones is accepted and padding refused with the reason."""
        return super().forward(input_ids, memory, labels=labels, attention_mask=attention_mask)

    def run(self, input_ids, memory=None, labels=None, attention_mask=None):
        return with_hf_conventions(self._run, input_ids, memory, labels, attention_mask)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.LongTensor:
        """Hugging Face's generate() for this segment model: the prompt's finished segments are
        prefilled under the schedule, then each token runs the model's own cell on that token with
        the current segment's key/value cache (wavefront/kv_decode.py; use_cache=False, or a cell
        whose blocks take no cache: the current segment whole); greedy tokens equal recomputing
        the model on the growing sequence. Settings come from keywords (max_new_tokens, do_sample,
        temperature, top_k, top_p, eos_token_id, pad_token_id, use_cache, memory_writes=False for
        the public ARMT client's read-only memory, ...) or `generation_config` (default: the model's).

        >>> import wavefront
        >>> from wavefront.models import ARMT, ARMTConfig
        >>> armt = ARMT(ARMTConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, segment_len=4, n_mem_tokens=2, d_mem=4))
        >>> wavefront.optimize(armt).generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5).shape
        torch.Size([1, 8])
        """
        kwargs.setdefault("generation_config", self.generation_config)
        self.before_call()  # a model changed since the last call is captured again first
        cached = self.cached_decoder() if self._unchanged_reason is None else None
        # without the cache (use_cache=False, or a cell that takes none) one segment at a time gains
        # nothing from the schedule: the model's own forward runs each token's segment where it
        # continues from a memory (else this model does, as the prefill)
        own = self.bound.reference if self.bound.reference_takes_memory and self._unchanged_reason is None else None
        return segment_generate(self, self.rg.segment_len, input_ids, decode=own, cached=cached,
                                dtype=self._param_dtype(), **kwargs)

    def cached_decoder(self) -> CachedSegmentDecoder | None:
        """The key/value-cached decoder generate() uses, if it gives the cell's own results for the
        model's dtype (checked once per capture and dtype; else None, and `.reason` says why)."""
        p = self._param_dtype()
        device = next(self.model.parameters()).device
        return self._decoder if self._decoder.check(p, device) else None

    @property
    def decode_reason(self) -> str:
        """Why generate() runs each token's current segment whole instead of with the key/value
        cache ("" when the cache is used for the model's dtype, or not checked yet)."""
        return self._decoder.reason

    def _param_dtype(self):
        return next(self.model.parameters()).dtype

    def _run(self, input_ids, memory=None):
        if self._unchanged_reason is not None:
            return self.model(input_ids, memory) if memory is not None else self.model(input_ids)
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
        return out

    def _run_timed(self, input_ids, schedule, memory):
        """WAVEFRONT_DEBUG=2: the call with every step timed, a summary printed on stderr."""
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

    def reference(self, input_ids, memory=None, labels=None, attention_mask=None):
        if self._unchanged_reason is not None:
            return SKIP  # the model itself ran
        if memory is not None and not self.bound.reference_takes_memory:
            return SKIP  # the model's own forward starts fresh only: verify the first fresh call instead
        return self.bound.reference(input_ids, memory)

    def compared(self, out, ref):
        """Logits and every memory tensor (logits only where the reference returns no memory)."""
        ref_memory = ref.memory.leaves() if isinstance(getattr(ref, "memory", None), MemoryState) else None
        got = [out.logits, *(out.memory.leaves() if ref_memory is not None else ())]
        return got, [ref.logits if hasattr(ref, "logits") else ref, *(ref_memory or ())]

    def describe_route(self) -> str:
        return f"the {self.schedule_kind} schedule on backend {self.backend}"

    def export_kind(self) -> str:
        return "segments"

    def _export(self, example_inputs: tuple, path: str, *, dynamic: bool = True, check: bool = True,
                decode: bool = False, **unused):
        """The one program under the diagonal schedule: one ONNX Scan over the steps, any segment
        count; decode=True: the decode step (backends/onnx/decode_export.py)."""
        if decode:
            return export_decode(self, example_inputs, path, check=check)
        return export_segments(self, example_inputs, path, dynamic=dynamic, check=check)

    def explain(self, n_segments: int | None = None) -> Explanation:
        if self._unchanged_reason is not None:
            return unchanged(type(self.model).__name__, self._unchanged_reason)
        rg, last = self.rg, self.last_schedule
        n = n_segments if n_segments is not None else (last.n_segments if last else None)
        batching = self.batched.describe() if self.batched is not None else ""
        if self.batched is not None:
            batching += "\n" + self.executor.describe_program()
        structure = rg.describe() + (f"\n  captured again after optimize(): {self.refreshed}" if self.refreshed else "")
        if self._decoder.reason:  # found by generate()'s first call
            structure += f"\n  generate(): no key/value cache ({self._decoder.reason})"
        return Explanation(rg.family, rg.adapter, structure, analyse(rg), self.schedule_kind, rg.n_layers, n,
                           batching, self.backend)

    def stages(self) -> list[Stage]:
        log = list(self.stage_log)
        if self.last_schedule is not None:
            log.append(Stage("schedule (last call)", self.last_schedule, 0.0, str(self.last_schedule)))
        return log

    def extra_repr(self) -> str:
        return f"schedule={self.schedule_kind!r}, backend={self.backend!r}, family={self.rg.family!r}"


def recognise(model: nn.Module) -> str | None:
    """'' when an adapter takes `model` as a segment model, None when none does."""
    return "" if segment_adapter_for(model) is not None else None


def preview(model: nn.Module, n_segments: int | None) -> Explanation:
    """explain() of a segment model not optimized yet: the capture and the verdict, no rewrite."""
    try:
        rg = capture(model)
    except AdapterRefused as e:
        return unchanged(type(model).__name__, str(e))
    verdict = analyse(rg)
    return Explanation(rg.family, rg.adapter, rg.describe(), verdict,
                       "diagonal" if verdict.diagonal_legal else "sequential", rg.n_layers, n_segments)


__all__ = ["COMPILING", "OptimizedModel", "preview", "recognise"]
