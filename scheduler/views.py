"""Terminal views of a Schedule (standard library only)."""
from __future__ import annotations


def grid_text(schedule, mark=frozenset()) -> str:
    """Layer x segment grid of step numbers; cells in `mark` get a '!' and unscheduled cells a '.'.

    >>> from wavefront.scheduler.schedule import diagonal
    >>> print(grid_text(diagonal(2, 3)))
    diagonal schedule: 2 layers x 3 segments, 4 steps
    step of each cell (rows: layers, columns: segments)
              s0  s1  s2
    layer 0    0   1   2
    layer 1    1   2   3
    """
    where = schedule.step_of()
    L, S = schedule.n_layers, schedule.n_segments
    width = max(len(str(max(schedule.num_steps - 1, 0))), len(f"s{S - 1}")) + 1
    label = len(f"layer {L - 1}") + 1
    lines = [f"{schedule.kind} schedule: {L} layers x {S} segments, {schedule.num_steps} steps",
             "step of each cell (rows: layers, columns: segments)",
             (" " * label + "".join(f"s{s}".rjust(width) + " " for s in range(S))).rstrip()]
    for l in range(L):
        row = []
        for s in range(S):
            text = str(where[(l, s)]) if (l, s) in where else "."
            row.append(text.rjust(width) + ("!" if (l, s) in mark else " "))
        lines.append((f"layer {l}".ljust(label) + "".join(row)).rstrip())
    return "\n".join(lines)


def lanes_text(schedule) -> str:
    """Per step, the cells that run together.

    >>> from wavefront.scheduler.schedule import diagonal
    >>> print(lanes_text(diagonal(2, 2)))
    step 0: (0, 0)
    step 1: (0, 1) (1, 0)
    step 2: (1, 1)
    """
    return "\n".join(f"step {t}: " + " ".join(f"({l}, {s})" for l, s in step) for t, step in enumerate(schedule.steps))
