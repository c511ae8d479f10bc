"""Schedules as data: capture, analyse, build, validate, print and serialise; RMT refused.

    python examples/inspect_schedules.py
"""
from wavefront.models import ARMT, RMT, ARMTConfig, RMTConfig
from wavefront.passes import analyse, build_grid
from wavefront.scheduler import Schedule, ScheduleError, capture, diagonal, lanes_text, validate

for model in (ARMT(ARMTConfig(n_layers=4)), RMT(RMTConfig(n_layers=4))):
    rg = capture(model)
    grid = build_grid(rg, n_segments=5)
    print(rg.describe())
    print(analyse(rg), f"(critical path: {grid.critical_path_length} cells)")
    sched = diagonal(4, 5)
    try:
        validate(sched, grid)
        print(sched, lanes_text(sched), sep="\n")
        assert Schedule.from_json(sched.to_json()) == sched
    except ScheduleError as e:
        print(f"refused at step {e.step}:\n{e}")
    print()
