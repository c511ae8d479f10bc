"""Timings: what one profiled run measured, per schedule step (plain data, like Schedule).

A step runs its cells together (one batched call), so each cell of a step is given the step's
whole duration: that is when the cell was in flight. `total_s` is the whole call; the part not
inside any step (embedding, output head, memory stacking) is `outside_s`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

Cell = tuple[int, int]


@dataclass(frozen=True)
class Timings:
    """Per-step durations of one run of a schedule.

    >>> t = Timings(step_s=(0.002, 0.003), total_s=0.006, device="cpu", clock="perf_counter")
    >>> t.step_start_s(), round(t.outside_s, 6)
    ((0.0, 0.002), 0.001)
    """

    step_s: tuple[float, ...]
    total_s: float
    device: str = "cpu"
    clock: str = "perf_counter"  # or "cuda events"
    path: str = ""  # how the steps ran ("one program", "step by step")
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        steps = tuple(float(x) for x in self.step_s)
        if any(x < 0 for x in steps):
            raise ValueError(f"step durations must be >= 0 seconds, got {steps}")
        object.__setattr__(self, "step_s", steps)

    @property
    def num_steps(self) -> int:
        return len(self.step_s)

    @property
    def steps_total_s(self) -> float:
        return sum(self.step_s)

    @property
    def outside_s(self) -> float:
        return max(0.0, self.total_s - self.steps_total_s)

    def step_start_s(self) -> tuple[float, ...]:
        """Start of each step, steps back to back from 0 (what a timeline draws)."""
        out, t = [], 0.0
        for d in self.step_s:
            out.append(t)
            t += d
        return tuple(out)

    def check_matches(self, schedule) -> None:
        """Raise ValueError unless these timings have one entry per step of `schedule`."""
        if self.num_steps != schedule.num_steps:
            raise ValueError(f"timings have {self.num_steps} steps but the {schedule.kind} schedule has "
                             f"{schedule.num_steps}: pass the timings profile() returned for this schedule")

    def to_dict(self) -> dict:
        return {"step_s": list(self.step_s), "total_s": self.total_s, "device": self.device, "clock": self.clock,
                "path": self.path, "extra": dict(self.extra)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def table(self, schedule=None, limit: int = 12) -> str:
        """A short text table: the slowest steps and the totals (the terminal twin of the timeline)."""
        lines = [f"measured on {self.device} ({self.clock}{', ' + self.path if self.path else ''}): "
                 f"total {1e3 * self.total_s:.2f} ms, steps {1e3 * self.steps_total_s:.2f} ms, "
                 f"outside steps {1e3 * self.outside_s:.2f} ms"]
        order = sorted(range(self.num_steps), key=lambda t: -self.step_s[t])[:limit]
        for t in sorted(order):
            cells = f" cells {len(schedule.steps[t])}" if schedule is not None else ""
            lines.append(f"  step {t:>4}:{cells} {1e3 * self.step_s[t]:9.3f} ms")
        if self.num_steps > limit:
            lines.append(f"  ({self.num_steps - limit} faster steps not shown)")
        return "\n".join(lines)
