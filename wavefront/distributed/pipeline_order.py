"""The order guard: which per-stage orders of segment forwards ("F", s) and backwards ("B", s)
keep a segment recurrence exact.

A stage carries its layers' memory from segment s to s + 1, so its forwards must run in
ascending segment order; and the gradient w.r.t. segment s's memory output comes from segment
s + 1's backward, so the backwards must run in descending order, each after every forward
(backpropagation through time). torch.distributed.pipelining's micro-batch schedules treat
micro-batches as independent: GPipe and 1F1B (and Interleaved1F1B, ZeroBubble, DualPipeV) run the
backward of micro-batch 0 first, which would silently drop every memory gradient. Only an order
that check_order accepts is run; `schedule_order` names the orders of torch's schedules so that
asking for one gets the reason it is refused.
"""
from __future__ import annotations


class ScheduleRefused(ValueError):
    """A schedule that would run segments out of order or truncate the gradients through memory."""


def bptt_order(n_segments: int, training: bool) -> list[tuple[str, int]]:
    """The order every stage runs: forwards ascending, then (training) backwards descending.

    >>> bptt_order(3, True)
    [('F', 0), ('F', 1), ('F', 2), ('B', 2), ('B', 1), ('B', 0)]
    """
    fwd = [("F", s) for s in range(n_segments)]
    return fwd + ([("B", s) for s in reversed(range(n_segments))] if training else [])


def check_order(actions, n_segments: int, training: bool, name: str = "the schedule") -> list[tuple[str, int]]:
    """`actions` if they run every segment's forward once in ascending order and, when training,
    every backward once in descending order after the last forward; else ScheduleRefused naming
    the first action that breaks the recurrence.

    >>> check_order([("F", 0), ("B", 0), ("F", 1), ("B", 1)], 2, True)
    Traceback (most recent call last):
    ...
    wavefront.distributed.pipeline_order.ScheduleRefused: the schedule runs ('B', 0) before the forward of segment 1: its memory gradient would be missing (truncated backpropagation through time)
    """
    actions = [(str(k), int(s)) for k, s in actions]
    next_f, next_b = 0, n_segments - 1
    for kind, s in actions:
        if kind == "F":
            if s != next_f:
                raise ScheduleRefused(f"{name} runs ('F', {s}) where segment {next_f}'s forward is next: a stage's "
                                      "memory goes from each segment to the next, so forwards must run in order")
            next_f += 1
        elif kind == "B":
            if not training:
                raise ScheduleRefused(f"{name} runs a backward in a forward-only call")
            if next_f < n_segments:
                raise ScheduleRefused(f"{name} runs ('B', {s}) before the forward of segment {next_f}: its memory "
                                      "gradient would be missing (truncated backpropagation through time)")
            if s != next_b:
                raise ScheduleRefused(f"{name} runs ('B', {s}) where segment {next_b}'s backward is next: the "
                                      f"gradient w.r.t. segment {s}'s memory comes from segment {s + 1}'s backward, "
                                      "so backwards must run in descending order")
            next_b -= 1
        else:
            raise ScheduleRefused(f"{name} has an action {kind!r}: only 'F' (forward) and 'B' (backward) are run")
    missing = next_f < n_segments or (training and next_b >= 0)
    if missing:
        raise ScheduleRefused(f"{name} does not run every segment's forward{' and backward' if training else ''}")
    return actions


def schedule_order(schedule, n_stages: int, rank: int, n_segments: int, training: bool) -> tuple[str, list]:
    """(its name, the actions) of `schedule` on stage `rank`: None or "bptt" (the pipeline's own
    order), a callable (n_stages, rank, n_segments, training) -> actions, or one of
    torch.distributed.pipelining's schedules (a class or its name) in the order it would run."""
    if schedule is None or schedule == "bptt":
        return "bptt", bptt_order(n_segments, training)
    if callable(schedule) and not isinstance(schedule, type):
        return getattr(schedule, "__name__", "the schedule"), list(schedule(n_stages, rank, n_segments, training))
    name = schedule.__name__ if isinstance(schedule, type) else str(schedule)
    short = name.removeprefix("Schedule")
    fwd = [("F", s) for s in range(n_segments)]
    if not training:
        return name, fwd  # every torch schedule runs the forwards in ascending order
    if short == "LoopedBFS":
        return name, bptt_order(n_segments, True)
    if short == "GPipe":
        return name, fwd + [("B", s) for s in range(n_segments)]
    if short in ("1F1B", "Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV", "ZeroBubble"):
        warm = min(n_segments, n_stages - rank)  # 1F1B: warm-up forwards, then one forward, one backward
        order = fwd[:warm]
        for s in range(n_segments):
            order.append(("B", s))
            if warm + s < n_segments:
                order.append(("F", warm + s))
        return name, order
    raise ScheduleRefused(f"unknown schedule {name!r}: pass None (forwards ascending, backwards descending), "
                          "a torch.distributed.pipelining schedule class, or a callable giving the actions")


__all__ = ["ScheduleRefused", "bptt_order", "check_order", "schedule_order"]
