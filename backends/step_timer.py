"""Per-step timing for profile(): CUDA events on a GPU, perf_counter on a CPU, and a
torch.profiler.record_function label per step so a user's own profiler trace shows the steps."""
from __future__ import annotations

import contextlib
import time

import torch


class StepTimer:
    """Accumulates the duration of each schedule step; executors call `with timer.step(t):`."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.clock = "cuda events" if self.cuda else "perf_counter"
        self.path = ""  # set by the executor: how the steps ran
        self._cpu: dict[int, float] = {}
        self._events: list = []

    @contextlib.contextmanager
    def step(self, t: int):
        with torch.profiler.record_function(f"wavefront step {t}"):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self._events.append((t, start, end))
            else:
                t0 = time.perf_counter()
                yield
                self._cpu[t] = self._cpu.get(t, 0.0) + time.perf_counter() - t0

    def durations(self, n_steps: int) -> tuple[float, ...]:
        """Seconds per step 0..n_steps-1 (synchronises the GPU first)."""
        out = [0.0] * n_steps
        if self.cuda:
            torch.cuda.synchronize()
            for t, start, end in self._events:
                out[t] += start.elapsed_time(end) / 1e3
        for t, d in self._cpu.items():
            out[t] += d
        return tuple(out)


def maybe_step(timer: StepTimer | None, t: int):
    """timer.step(t), or a no-op context when nothing is being profiled."""
    return timer.step(t) if timer is not None else contextlib.nullcontext()
