"""The diagonal batching pass: make a captured recurrence run a whole anti-diagonal per call.

From a RecurrenceGraph whose verdict is legal it builds, for each layer kind, a parameter stack
(the layers' storage, see stacking.py) and a batched layer cell (lane_batching.py /
lane_fold.py). Executors then run each diagonal step's cells of one kind and one segment length
as a single call on a contiguous slice of the stack (the first-segment flag is per lane).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from wavefront.passes.dependence import Verdict, analyse
from wavefront.passes.lanes.fold_cell import compiled_label, fold_lanes
from wavefront.passes.lanes.fold_graph import (
    FoldNotApplicable,
    joint_names,
    linear_groups,
)
from wavefront.passes.lanes.signature import LaneSignature
from wavefront.passes.lanes.stacking import LayersNotStackable, ParameterStack
from wavefront.passes.lanes.vmap_cell import VmapLaneCell
from wavefront.scheduler.recurrence_graph import RecurrenceGraph
from wavefront.scheduler.train_mode import reads_training


class DiagonalBatchingIllegal(ValueError):
    """Diagonal batching would change the result of this model; the message names the edge."""

    def __init__(self, verdict: Verdict, family: str):
        super().__init__(f"diagonal batching is not legal for {family}: {verdict.reason} "
                         "(optimize(model, schedule='sequential') runs it in order)")
        self.verdict = verdict


@dataclass
class LaneGroup:
    """The layers of one kind: their stack and their batched cell."""

    kind: int
    layers: tuple[int, ...]
    stack: ParameterStack
    cell: object
    reason: str = ""

    @property
    def mode(self) -> str:
        return self.cell.mode


@dataclass
class BatchedRecurrence:
    """Result of the pass: per-kind groups; `position[l]` = (group, index of layer l in it)."""

    rg: RecurrenceGraph
    groups: list[LaneGroup]
    position: dict[int, tuple[LaneGroup, int]] = field(default_factory=dict)
    signatures: list[LaneSignature] = field(default_factory=list)
    _mode_modules: dict = field(default_factory=dict, repr=False)

    def check(self) -> None:
        """Before each model call: stacks still the layers' storage, folded assumptions hold, lane
        clones in the layers' train/eval mode."""
        for g in self.groups:
            g.stack.check()
            if hasattr(g.cell, "check_invariants"):
                g.cell.check_invariants()
            if hasattr(g.cell, "sync_modes"):
                g.cell.sync_modes(any(m.training for m in self._mode_dependent(g)))

    def _mode_dependent(self, group: LaneGroup) -> list:
        """The modules of a kind's layers whose code reads the train/eval flag (found once)."""
        if group.kind not in self._mode_modules:
            layers = self.rg.cell.layers
            self._mode_modules[group.kind] = [m for l in group.layers for m in layers[l].modules() if reads_training(m)]
        return self._mode_modules[group.kind]

    def describe(self) -> str:
        lines = []
        for g in self.groups:
            notes = [g.reason, getattr(g.cell, "fallback_reason", ""),
                     f"compile failed, running eager: {g.cell.compile_error}" if getattr(g.cell, "compile_error", "") else "",
                     compiled_label(g.cell)]
            notes = "; ".join(n for n in notes if n)
            lines.append(f"  kind {g.kind}: layers {list(g.layers)} batched by {g.mode}" + (f" ({notes})" if notes else ""))
        return "\n".join(lines)


def diagonal_batching(rg: RecurrenceGraph, *, fold: bool = True) -> BatchedRecurrence:
    """Stack each kind's parameters and build its batched cell; refuse illegal structures.

    >>> from wavefront.models import ARMT, ARMTConfig
    >>> from wavefront.scheduler import capture
    >>> br = diagonal_batching(capture(ARMT(ARMTConfig(n_layers=3))))
    >>> [(g.layers, g.mode) for g in br.groups]
    [((0, 1, 2), 'fold')]
    """
    verdict = analyse(rg)
    if not verdict.diagonal_legal:
        raise DiagonalBatchingIllegal(verdict, rg.family)
    signatures = [LaneSignature(n, rg.first_node) for n in rg.layer_nodes]
    groups, position = [], {}
    for kind in sorted(set(rg.layer_kinds)):
        layers = tuple(l for l, k in enumerate(rg.layer_kinds) if k == kind)
        graphs = [rg.layer_graphs[l] for l in layers]
        fused = []
        if fold:
            fused = linear_groups(graphs[0])
        try:
            stack = ParameterStack(graphs, joint=joint_names(fused, graphs[0]) if fused else ())
        except LayersNotStackable as e:
            raise LayersNotStackable(f"layers {list(layers)} of {rg.family}: {e}") from e
        cell, reason = None, ""
        if fold:
            try:
                cell = fold_lanes(graphs[0], signatures[layers[0]], stack, fused)
            except FoldNotApplicable as e:
                reason = f"lane fold not applicable: {e}"
        if cell is None:
            cell = VmapLaneCell(graphs[0], signatures[layers[0]])
        group = LaneGroup(kind, layers, stack, cell, reason)
        groups.append(group)
        for i, l in enumerate(layers):
            position[l] = (group, i)
    return BatchedRecurrence(rg, groups, position, signatures)
