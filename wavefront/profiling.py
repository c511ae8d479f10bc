"""profile(): run an optimized model once and time each schedule step."""
from __future__ import annotations

import time

import torch

from wavefront.api import OnnxRuntimeModel, OptimizedModel
from wavefront.backends.step_timer import StepTimer
from wavefront.benchmarking import device_name
from wavefront.scheduler.timings import Timings


def profile(optimized, input_ids: torch.Tensor, memory=None) -> Timings:
    """Run `optimized` (what optimize() returned) once on `input_ids` and time every schedule step:
    CUDA events on a GPU, perf_counter on a CPU, each step labelled "wavefront step t" for
    torch.profiler. The model's memory is not changed (the call is the model's own call with
    `memory` given explicitly, which returns a new state). The schedule that ran is
    wavefront.last_schedule(optimized); pass both to schedule.to_chrome_trace / to_html.

    >>> import torch, wavefront
    >>> from wavefront.models import ARMT, ARMTConfig
    >>> fast = wavefront.optimize(ARMT(ARMTConfig(n_layers=2, segment_len=8)))
    >>> t = wavefront.profile(fast, torch.randint(0, 100, (1, 24)))
    >>> t.num_steps == wavefront.last_schedule(fast).num_steps == 4
    True
    """

    if isinstance(optimized, OnnxRuntimeModel):
        raise ValueError("profile() times steps that wavefront runs; under backend='onnxruntime' the steps run "
                         "inside one ONNX Scan node: profile the torch or inductor backend instead")
    if not isinstance(optimized, OptimizedModel):
        raise TypeError(f"profile() times the schedule steps of a segment model wavefront.optimize() returned, got "
                        f"{type(optimized).__name__}: optimize the model first")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
    executor = optimized.executor
    timer = StepTimer(input_ids.device)
    executor.step_timer = timer
    sync = torch.cuda.synchronize if timer.cuda else (lambda: None)
    try:
        sync()
        t0 = time.perf_counter()
        optimized(input_ids, memory)
        sync()
        total = time.perf_counter() - t0
    finally:
        executor.step_timer = None
    schedule = optimized.last_schedule
    return Timings(timer.durations(schedule.num_steps), total, device_name(str(input_ids.device)), timer.clock,
                   timer.path, {"schedule": schedule.kind, "n_layers": schedule.n_layers,
                                "n_segments": schedule.n_segments, "backend": optimized.backend})
