"""Schedule: plain, frozen data. Ordered steps, each a set of (layer, segment) cells run together.

Builders: sequential (segment-major, one cell a step) and diagonal (step t = cells with
l + s = t). validate() proves a schedule against a cell grid; to_json / from_json round-trip
exactly. The math of the model never appears here (Halide's split of algorithm and schedule).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from wavefront.scheduler.html_report import write_html
from wavefront.scheduler.trace import write_chrome_trace
from wavefront.scheduler.views import grid_text, lanes_text

Cell = tuple[int, int]
JSON_FORMAT = "wavefront.schedule"
JSON_VERSION = 1


class ScheduleError(ValueError):
    """A schedule that is malformed or violates a dependence. `step` is the offending step
    (None when the problem is not one step's, e.g. cells never run)."""

    def __init__(self, message: str, step: int | None = None, cells: tuple[Cell, ...] = ()):
        super().__init__(message)
        self.step, self.cells = step, tuple(cells)


@dataclass(frozen=True)
class Schedule:
    """Ordered steps over an n_layers x n_segments grid of cells.

    >>> s = diagonal(2, 3)
    >>> s.num_steps, s.steps[1]
    (4, ((0, 1), (1, 0)))
    >>> Schedule.from_json(s.to_json()) == s
    True
    """

    kind: str
    n_layers: int
    n_segments: int
    steps: tuple[tuple[Cell, ...], ...]

    def __post_init__(self):
        for name in ("n_layers", "n_segments"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ScheduleError(f"{name} must be a positive int, got {v!r}")
        steps = []
        for t, step in enumerate(self.steps):
            cells = []
            for cell in step:
                if not (isinstance(cell, (tuple, list)) and len(cell) == 2
                        and all(isinstance(x, int) and not isinstance(x, bool) for x in cell)):
                    raise ScheduleError(f"step {t}: a cell must be a (layer, segment) pair of ints, got {cell!r}", t)
                l, s = cell
                if not (0 <= l < self.n_layers and 0 <= s < self.n_segments):
                    raise ScheduleError(f"step {t}: cell ({l}, {s}) is outside the {self.n_layers} x "
                                        f"{self.n_segments} grid", t, ((l, s),))
                cells.append((l, s))
            if len(set(cells)) != len(cells):
                dup = sorted({c for c in cells if cells.count(c) > 1})
                raise ScheduleError(f"step {t} lists cell(s) {dup} more than once", t, tuple(dup))
            if not cells:
                raise ScheduleError(f"step {t} is empty", t)
            steps.append(tuple(sorted(cells)))
        object.__setattr__(self, "steps", tuple(steps))

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def lower(self) -> "LaneSteps | None":
        """The lane form of this schedule if it is the diagonal one (its steps exactly
        LaneSteps'), else None: other orders run step by step.

        >>> diagonal(2, 3).lower(), sequential(2, 3).lower()
        (LaneSteps(n_layers=2), None)
        """
        cached = self.__dict__.get("_lowered", False)  # computed once per schedule (executors ask every call)
        if cached is False:
            lanes = LaneSteps(self.n_layers)
            cached = lanes if self.steps == lanes.schedule(self.n_segments).steps else None
            object.__setattr__(self, "_lowered", cached)
        return cached

    def step_of(self) -> dict[Cell, int]:
        """Step index of every scheduled cell (the first, if a cell is listed twice)."""
        out: dict[Cell, int] = {}
        for t, step in enumerate(self.steps):
            for c in step:
                out.setdefault(c, t)
        return out

    def to_dict(self) -> dict:
        return {"format": JSON_FORMAT, "version": JSON_VERSION, "kind": self.kind, "n_layers": self.n_layers,
                "n_segments": self.n_segments, "steps": [[list(c) for c in step] for step in self.steps]}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        """Parse what to_json wrote; malformed input raises ScheduleError saying what is wrong."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ScheduleError(f"schedule JSON does not parse: {e}") from e
        if not isinstance(d, dict) or d.get("format") != JSON_FORMAT:
            raise ScheduleError(f"not a wavefront schedule: expected an object with \"format\": \"{JSON_FORMAT}\"")
        if d.get("version") != JSON_VERSION:
            raise ScheduleError(f"schedule JSON version {d.get('version')!r} is not supported (this wavefront reads {JSON_VERSION})")
        missing = [k for k in ("kind", "n_layers", "n_segments", "steps") if k not in d]
        if missing:
            raise ScheduleError(f"schedule JSON lacks {', '.join(missing)}")
        if not isinstance(d["steps"], list) or not all(isinstance(s, list) for s in d["steps"]):
            raise ScheduleError("schedule JSON 'steps' must be a list of lists of [layer, segment] pairs")
        return cls(str(d["kind"]), d["n_layers"], d["n_segments"],
                   tuple(tuple(tuple(c) if isinstance(c, list) else c for c in step) for step in d["steps"]))

    def __str__(self) -> str:
        return grid_text(self)

    def lanes_text(self) -> str:
        """Per step, the cells that run together (the terminal twin of the timeline)."""
        return lanes_text(self)

    def to_chrome_trace(self, path: str, timings=None, grid=None) -> str:
        """Write Chrome trace-event JSON (Perfetto, chrome://tracing): a track per layer, a slice
        per cell, flow arrows for the dependencies of `grid` (passes.build_grid: the model's own
        edges; without it, no arrows); real durations when `timings` (from wavefront.profile)
        are given. Returns the path."""
        return write_chrome_trace(self, path, timings, grid)

    def to_html(self, path: str, timings=None, compare=None) -> str:
        """Write one self-contained HTML report (inline SVG and CSS, no scripts, no network):
        the grid coloured by step, the timeline, hover details per cell, step counts and the
        speedup bound; `compare` (a Schedule, or (Schedule, Timings)) is shown beside. Returns the path."""
        return write_html(self, path, timings, compare)

    def plot(self, timings=None):
        """A matplotlib Figure: heat map of the step (or, with `timings`, the measured time) per
        cell. Needs matplotlib (pip install 'wavefront[viz]')."""
        from wavefront.scheduler.plot import plot_schedule
        return plot_schedule(self, timings)


@dataclass(frozen=True)
class LaneSteps:
    """The diagonal schedule lowered for a batched program: lane l is layer l, and at step t it
    runs segment t - l. The one home of that rule; the step executor, the one-program form and
    the ONNX export all read it from here.

    >>> lanes = LaneSteps(3)
    >>> lanes.num_steps(4), lanes.active(0, 4), lanes.active(5, 4)
    (6, (0, 1), (2, 3))
    """

    n_layers: int

    def num_steps(self, n_segments: int) -> int:
        return self.n_layers + n_segments - 1

    def segment(self, t: int, lane: int) -> int:
        """The segment lane `lane` holds at step t (outside 0..S-1 in warm-up and drain)."""
        return t - lane

    def active(self, t: int, n_segments: int) -> tuple[int, int]:
        """[lo, hi): the lanes that hold a real segment at step t (a contiguous range)."""
        return max(0, t - n_segments + 1), min(self.n_layers, t + 1)

    def segment_grid(self, n_segments, device=None):
        """[steps, lanes] tensor of segment indices t - l; n_segments may be symbolic (export)."""
        import torch
        return (torch.arange(self.n_layers + n_segments - 1, device=device)[:, None]
                - torch.arange(self.n_layers, device=device)[None, :])

    def schedule(self, n_segments: int) -> Schedule:
        """The same rule as a Schedule (plain data) over n_segments segments."""
        return Schedule("diagonal", self.n_layers, n_segments, tuple(
            tuple((l, self.segment(t, l)) for l in range(*self.active(t, n_segments)))
            for t in range(self.num_steps(n_segments))))


def sequential(n_layers: int, n_segments: int) -> Schedule:
    """Segment-major order, one cell per step: what the model's own forward does. L * S steps."""
    return Schedule("sequential", n_layers, n_segments,
                    tuple(((l, s),) for s in range(n_segments) for l in range(n_layers)))


def diagonal(n_layers: int, n_segments: int) -> Schedule:
    """Step t runs every cell with l + s = t: L + S - 1 steps (LaneSteps holds the rule)."""
    return LaneSteps(n_layers).schedule(n_segments)


BUILDERS = {"sequential": sequential, "diagonal": diagonal}


def build_schedule(kind: str, n_layers: int, n_segments: int) -> Schedule:
    """Build a named schedule ('sequential' or 'diagonal')."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown schedule {kind!r}: choose one of {sorted(BUILDERS)}")
    return BUILDERS[kind](n_layers, n_segments)


def validate(schedule: Schedule, grid) -> None:
    """Prove `schedule` runs `grid` (passes.CellGrid) correctly, or raise ScheduleError.

    Every cell must appear exactly once and every dependence edge must point to a later step;
    the error names and marks the offending step.
    """

    if (schedule.n_layers, schedule.n_segments) != (grid.n_layers, grid.n_segments):
        raise ScheduleError(f"schedule is for {schedule.n_layers} layers x {schedule.n_segments} segments, but the "
                            f"grid has {grid.n_layers} x {grid.n_segments}")
    where: dict[Cell, int] = {}
    for t, step in enumerate(schedule.steps):
        for c in step:
            if c in where:
                raise ScheduleError(f"step {t} runs cell {c} again (it already ran at step {where[c]})\n"
                                    + grid_text(schedule, mark={c}), t, (c,))
            where[c] = t
    missing = sorted(set(grid.graph.nodes) - set(where))
    if missing:
        raise ScheduleError(f"cells {missing[:8]}{' ...' if len(missing) > 8 else ''} are never run\n"
                            + grid_text(schedule), None, tuple(missing))
    bad = [(where[v], u, v, k) for u, v, k in grid.graph.edges(data="kind") if where[u] >= where[v]]
    if bad:
        t, u, v, kind = min(bad)
        when = "in the same step" if where[u] == t else f"later, at step {where[u]}"
        raise ScheduleError(f"step {t} runs cell {v} but it needs cell {u} ({kind} edge), which runs {when}\n"
                            + grid_text(schedule, mark={u, v}), t, (u, v))
