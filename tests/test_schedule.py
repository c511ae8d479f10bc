"""Schedules as data: validity, JSON round trip, text views, errors (no kernel runs)."""
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wavefront.passes import build_grid
from wavefront.scheduler import (RecurrenceStructure, Schedule, ScheduleError, StateLink, build_schedule, diagonal,
                                 grid_text, lanes_text, sequential, validate)


def armt_structure(L):
    return RecurrenceStructure(L, tuple((l - 1, l) for l in range(1, L)),
                               tuple(StateLink(l, f"A_{l}", l, (l,)) for l in range(L)))


def rmt_structure(L):
    return RecurrenceStructure(L, tuple((l - 1, l) for l in range(1, L)), (StateLink(0, "mem", L - 1, (0,)),))


sizes = st.tuples(st.integers(1, 9), st.integers(1, 12))


@settings(max_examples=60, deadline=None)
@given(sizes)
def test_builders_are_valid_on_armt_grids(ls):
    L, S = ls
    grid = build_grid(armt_structure(L), S)
    validate(sequential(L, S), grid)
    d = diagonal(L, S)
    validate(d, grid)
    assert d.num_steps == L + S - 1 == grid.critical_path_length
    for t, step in enumerate(d.steps):
        assert set(step) == {(l, s) for l in range(L) for s in range(S) if l + s == t}
    assert sequential(L, S).steps == tuple(((l, s),) for s in range(S) for l in range(L))


@settings(max_examples=60, deadline=None)
@given(sizes, st.sampled_from(["sequential", "diagonal"]))
def test_json_round_trip_is_exact(ls, kind):
    s = build_schedule(kind, *ls)
    text = s.to_json()
    back = Schedule.from_json(text)
    assert back == s and back.to_json() == text and back.steps == s.steps


@settings(max_examples=60, deadline=None)
@given(sizes, st.randoms(use_true_random=False))
def test_any_topological_order_is_valid_and_any_swap_of_dependent_cells_is_caught(ls, rnd):
    import networkx as nx
    L, S = ls
    grid = build_grid(armt_structure(L), S)
    order = list(nx.lexicographical_topological_sort(grid.graph, key=lambda c: rnd.random()))
    sched = Schedule("custom", L, S, tuple((c,) for c in order))
    validate(sched, grid)
    edges = list(grid.graph.edges)
    if edges:
        u, v = rnd.choice(edges)
        pos = {c: i for i, c in enumerate(order)}
        order[pos[u]], order[pos[v]] = v, u
        with pytest.raises(ScheduleError) as info:
            validate(Schedule("custom", L, S, tuple((c,) for c in order)), grid)
        assert info.value.step is not None and f"step {info.value.step} runs cell" in str(info.value)


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(2, 8), st.integers(2, 10)))
def test_diagonal_is_rejected_for_rmt_with_the_step_named(ls):
    L, S = ls
    grid = build_grid(rmt_structure(L), S)
    validate(sequential(L, S), grid)
    with pytest.raises(ScheduleError) as info:
        validate(diagonal(L, S), grid)
    assert info.value.step == 1 and info.value.cells == ((L - 1, 0), (0, 1))
    assert "step 1 runs cell (0, 1) but it needs cell" in str(info.value)


def test_golden_grid_and_lanes_text():
    assert str(diagonal(3, 4)) == "\n".join([
        "diagonal schedule: 3 layers x 4 segments, 6 steps",
        "step of each cell (rows: layers, columns: segments)",
        "         s0  s1  s2  s3",
        "layer 0   0   1   2   3",
        "layer 1   1   2   3   4",
        "layer 2   2   3   4   5",
    ])
    assert str(sequential(2, 2)).splitlines()[2:] == ["         s0  s1", "layer 0   0   2", "layer 1   1   3"]
    assert lanes_text(diagonal(2, 2)) == "step 0: (0, 0)\nstep 1: (0, 1) (1, 0)\nstep 2: (1, 1)"


def test_error_marks_the_offending_step():
    L, S = 3, 4
    grid = build_grid(armt_structure(L), S)
    steps = list(diagonal(L, S).steps)
    steps[2], steps[3] = steps[3], steps[2]
    with pytest.raises(ScheduleError) as info:
        validate(Schedule("bad", L, S, tuple(steps)), grid)
    assert info.value.step == 2
    assert "!" in str(info.value) and grid_text(Schedule("bad", L, S, tuple(steps))).splitlines()[0] in str(info.value)


def test_missing_and_duplicate_cells():
    grid = build_grid(armt_structure(2), 2)
    with pytest.raises(ScheduleError, match="never run"):
        validate(Schedule("x", 2, 2, (((0, 0),), ((1, 0),), ((0, 1),))), grid)
    with pytest.raises(ScheduleError, match="step 2 runs cell \\(0, 0\\) again") as info:
        validate(Schedule("x", 2, 2, (((0, 0),), ((1, 0),), ((0, 0),), ((0, 1),), ((1, 1),))), grid)
    assert info.value.step == 2
    with pytest.raises(ScheduleError, match="more than once"):
        Schedule("x", 2, 2, (((0, 0), (0, 0)),))
    with pytest.raises(ScheduleError, match="outside"):
        Schedule("x", 2, 2, (((2, 0),),))
    with pytest.raises(ScheduleError, match="2 layers x 2 segments"):
        validate(diagonal(2, 2), build_grid(armt_structure(2), 3))


@pytest.mark.parametrize("text, message", [
    ("not json", "does not parse"),
    ("[]", "not a wavefront schedule"),
    (json.dumps({"format": "wavefront.schedule", "version": 99}), "version 99"),
    (json.dumps({"format": "wavefront.schedule", "version": 1, "kind": "x"}), "lacks n_layers"),
    (json.dumps({"format": "wavefront.schedule", "version": 1, "kind": "x", "n_layers": 1, "n_segments": 1,
                 "steps": [[[0, "a"]]]}), "pair of ints"),
])
def test_from_json_rejects_malformed_input(text, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule.from_json(text)


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
        build_schedule("zigzag", 2, 2)


def test_schedule_is_frozen():
    s = diagonal(2, 2)
    with pytest.raises(Exception):
        s.kind = "other"
    assert random.Random(0).random() >= 0  # hashable, usable as data
    assert hash(s) == hash(diagonal(2, 2))
