"""Cell grids, critical paths and the diagonal-batching verdict."""
import pytest

from conftest import N_LAYERS, tiny_armt, tiny_rmt
from wavefront.passes import analyse, build_grid
from wavefront.scheduler import capture


@pytest.mark.parametrize("S", [1, 2, 5])
def test_armt_grid(S):
    grid = build_grid(capture(tiny_armt()), S)
    L = N_LAYERS
    kinds = [k for _, _, k in grid.graph.edges(data="kind")]
    assert kinds.count("hidden") == (L - 1) * S and kinds.count("state") == L * (S - 1)
    assert grid.critical_path_length == L + S - 1
    for u, v, k in grid.graph.edges(data="kind"):
        assert (v[0] - u[0], v[1] - u[1]) == ((1, 0) if k == "hidden" else (0, 1))


def test_rmt_grid_is_a_chain():
    grid = build_grid(capture(tiny_rmt()), 4)
    assert grid.critical_path_length == N_LAYERS * 4
    assert grid.graph.edges[(N_LAYERS - 1, 0), (0, 1)]["kind"] == "state"


def test_verdicts():
    ok = analyse(capture(tiny_armt()))
    assert ok.diagonal_legal and ok.offending_edge is None and "L + S - 1" in ok.reason
    bad = analyse(capture(tiny_rmt()))
    L = N_LAYERS
    assert not bad.diagonal_legal
    assert bad.offending_edge == ((L - 1, 0), (0, 1)) and bad.offending_kind == "state"
    assert f"({L - 1}, s) -> (0, s+1)" in bad.reason and "sequential" in bad.reason


def test_bad_segment_count():
    with pytest.raises(ValueError, match="n_segments"):
        build_grid(capture(tiny_armt()), 0)
