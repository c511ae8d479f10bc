"""Batched layer calls: run several layers of one kind on a leading "lane" dimension, each lane
with its own layer's parameters.

The general form comes from torch.func: vmap over functional_call of the layer's captured
graph, which batches any layer, foreign blocks included. (fold_graph.py adds a faster rewrite
for layers whose graphs are fully traced.)
"""
from __future__ import annotations

import threading

from torch import fx
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten
from wavefront.passes.lanes.signature import LaneSignature

from wavefront.models.opaque import OpaqueModule


class VmapLaneCell(OpaqueModule):
    """Layers of one kind batched with torch.func.vmap(functional_call(template, ...)).

    forward(params, lane_values) -> output leaves stacked on lanes, and the
    output structure. params: {name: [lanes, *shape]}, lane_values: [lanes, ...] tensors.
    (`layers`, the lanes' layer modules, is accepted for FoldLaneCell's interface and unused.)
    """

    mode = "vmap"

    def __init__(self, template: fx.GraphModule, signature: LaneSignature):
        super().__init__()
        self.template = template
        self.signature = signature
        self._out_spec = None
        self._lock = threading.Lock()  # functional_call swaps the template's (the user's) parameters for the call

    def forward(self, params, lane_values, layers=None):
        sig = self.signature

        def one_lane(p, lane):
            args, kwargs = sig.rebuild(lane)
            out = functional_call(self.template, p, args, kwargs)
            leaves, spec = tree_flatten(out)
            self._out_spec = spec
            return tuple(leaves)

        # randomness="different": each lane draws its own dropout masks, as separate layer calls would
        with self._lock:
            leaves = vmap(one_lane, in_dims=(0, 0), randomness="different")(params, tuple(lane_values))
        return list(leaves), self._out_spec
