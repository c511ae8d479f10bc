"""Chrome trace-event JSON of a Schedule (opens in Perfetto / chrome://tracing).

One process per device, one thread (track) per layer; each cell is a complete event ("X") on its
layer's track, spanning its step (real durations when Timings are given, else 1 ms per step);
flow arrows ("s" -> "f") for the dependencies, taken from the model's cell grid
(passes.build_grid) when one is given: never guessed, since an RMT's memory flows (L-1, s) ->
(0, s+1) where an ARMT's flows (l, s-1) -> (l, s). Without a grid the trace has no arrows.
"""
from __future__ import annotations

import json

UNIT_STEP_US = 1000.0  # without timings every step is drawn 1 ms long


def trace_events(schedule, timings=None, grid=None) -> dict:
    """The trace as a dict ({"traceEvents": [...], "displayTimeUnit": "ms", ...}).

    >>> from wavefront.scheduler.schedule import diagonal
    >>> ev = trace_events(diagonal(2, 2))["traceEvents"]
    >>> sorted({e["ph"] for e in ev})  # no grid given: slices, no dependency arrows
    ['M', 'X']
    """
    if timings is not None:
        timings.check_matches(schedule)
        starts = [1e6 * x for x in timings.step_start_s()]
        durs = [1e6 * x for x in timings.step_s]
        device = timings.device
    else:
        starts = [UNIT_STEP_US * t for t in range(schedule.num_steps)]
        durs = [UNIT_STEP_US] * schedule.num_steps
        device = "unit steps (no timings)"
    pid = 1
    events = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"wavefront {schedule.kind} schedule: "
                                                                        f"{device}"}},
              {"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": 0}}]
    for l in range(schedule.n_layers):
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": l + 1, "args": {"name": f"layer {l}"}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": l + 1, "args": {"sort_index": l}})
    where = schedule.step_of()
    for t, step in enumerate(schedule.steps):
        for l, s in step:
            events.append({"ph": "X", "name": f"L{l} S{s}", "cat": "cell", "pid": pid, "tid": l + 1,
                           "ts": starts[t], "dur": durs[t],
                           "args": {"layer": l, "segment": s, "step": t, "cells_in_step": len(step),
                                    "duration_ms": durs[t] / 1e3 if timings is not None else None}})
    edges = [(u, v, k) for u, v, k in grid.graph.edges(data="kind")] if grid is not None else []
    for i, (u, v, kind) in enumerate(edges):
        if u not in where or v not in where:
            continue
        tu, tv = where[u], where[v]
        # the start binds to the source cell's slice, the finish to the enclosing slice at its ts
        events.append({"ph": "s", "id": i + 1, "name": kind, "cat": "dependency", "pid": pid, "tid": u[0] + 1,
                       "ts": starts[tu] + durs[tu] / 2})
        events.append({"ph": "f", "bp": "e", "id": i + 1, "name": kind, "cat": "dependency", "pid": pid,
                       "tid": v[0] + 1, "ts": starts[tv] + durs[tv] / 2})
    meta = {"schedule": schedule.to_dict(), "timings": timings.to_dict() if timings is not None else None,
            "edges": "from the cell grid" if grid is not None else "none (no grid given)"}
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"wavefront": meta}}


def write_chrome_trace(schedule, path: str, timings=None, grid=None) -> str:
    """Write the trace to `path` (a .json file); returns the path."""
    with open(path, "w") as f:
        json.dump(trace_events(schedule, timings, grid), f)
    return path
