"""Dependence analysis: the cell grid of a captured model over S segments, and the verdict.

Cell (l, s) = layer l on segment s. "hidden" edges join cells of one segment (layer k's output
feeds layer l); "state" edges join a state's producer in segment s to its consumers in s + 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from wavefront.scheduler.recurrence_graph import RecurrenceGraph, RecurrenceStructure

Cell = tuple[int, int]


def _structure(rg) -> RecurrenceStructure:
    return rg.structure if isinstance(rg, RecurrenceGraph) else rg


@dataclass(frozen=True)
class CellGrid:
    """The (layer, segment) cells and their dependence edges (networkx DiGraph, edge attr `kind`)."""

    n_layers: int
    n_segments: int
    graph: nx.DiGraph

    @property
    def critical_path(self) -> list[Cell]:
        """The longest chain of dependent cells: no schedule has fewer steps than its length."""
        return nx.dag_longest_path(self.graph, default_weight=1, topo_order=None)

    @property
    def critical_path_length(self) -> int:
        return len(self.critical_path)


def build_grid(rg: RecurrenceGraph | RecurrenceStructure, n_segments: int) -> CellGrid:
    """Cell grid of `rg` over `n_segments` segments.

    >>> from wavefront.scheduler.recurrence_graph import RecurrenceStructure, StateLink
    >>> armt = RecurrenceStructure(2, ((0, 1),), (StateLink(0, "A_0", 0, (0,)), StateLink(1, "A_1", 1, (1,))))
    >>> build_grid(armt, 3).critical_path_length   # L + S - 1
    4
    """
    st = _structure(rg)
    if not isinstance(n_segments, int) or n_segments < 1:
        raise ValueError(f"n_segments must be a positive int, got {n_segments!r}")
    g = nx.DiGraph()
    g.add_nodes_from((l, s) for s in range(n_segments) for l in range(st.n_layers))
    for s in range(n_segments):
        for k, l in st.hidden_links:
            g.add_edge((k, s), (l, s), kind="hidden")
        if s + 1 < n_segments:
            for link in st.state_links:
                for c in link.consumers:
                    if not g.has_edge((link.producer, s), (c, s + 1)):
                        g.add_edge((link.producer, s), (c, s + 1), kind="state", state=link.name)
    if not nx.is_directed_acyclic_graph(g):
        raise ValueError("the captured dependences form a cycle within a segment: no schedule can run this model")
    return CellGrid(st.n_layers, n_segments, g)


@dataclass(frozen=True)
class Verdict:
    """Which rewrites are legal for a structure, and why not."""

    diagonal_legal: bool
    reason: str
    offending_edge: tuple[Cell, Cell] | None = None
    offending_kind: str | None = None

    def __str__(self):
        return ("diagonal batching: legal. " if self.diagonal_legal else "diagonal batching: ILLEGAL. ") + self.reason


def analyse(rg: RecurrenceGraph | RecurrenceStructure) -> Verdict:
    """Is diagonal batching (step of cell (l, s) = l + s) exact for this structure, for every S?

    Legal iff every edge goes to a later diagonal: hidden k -> l needs l > k; a state written by
    layer p and read by layer c of the next segment needs c >= p. Otherwise the first offending
    edge is named, e.g. RMT's (L-1, s) -> (0, s+1).
    """
    st = _structure(rg)
    for k, l in st.hidden_links:
        if l <= k:
            return Verdict(False, f"hidden edge ({k}, s) -> ({l}, s) does not go to a later diagonal",
                           ((k, 0), (l, 0)), "hidden")
    for link in st.state_links:
        for c in link.consumers:
            if c < link.producer:
                return Verdict(
                    False,
                    f"state '{link.name}' is written by layer {link.producer} and read by layer {c} of the next "
                    f"segment: edge ({link.producer}, s) -> ({c}, s+1) goes back {link.producer - c} diagonal(s), "
                    f"so the critical path is longer than L + S - 1. Use the sequential schedule.",
                    ((link.producer, 0), (c, 1)), "state")
    return Verdict(True, "every state is read by the layer that wrote it (or a later one) in the next segment, "
                         "so all cells with l + s = t are independent: L + S - 1 steps")
