"""Batched layer calls: run several layers of one kind on a leading "lane" dimension, each lane
with its own layer's parameters.

The general form comes from torch.func: vmap over functional_call of the layer's captured
graph, which batches any layer, foreign blocks included. (lane_fold.py adds a faster rewrite
for layers whose graphs are fully traced.)
"""
from __future__ import annotations

import threading

from torch import fx
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from wavefront.models.opaque import OpaqueModule


class LaneSignature:
    """How a layer call's arguments split into per-lane tensors and values shared by all lanes.

    Built from the layer's call node in the captured cell graph: every node argument is per
    lane (the first-segment flag too: a step can mix a layer's first segment with later ones),
    constants are shared. `flag_lane` is the flag's index among the lane values (or None).
    """

    def __init__(self, layer_node: fx.Node, first_node: fx.Node):
        leaves, self.spec = tree_flatten((tuple(layer_node.args), dict(layer_node.kwargs)))
        self.leaves = leaves
        self.lane_pos = [i for i, x in enumerate(leaves) if isinstance(x, fx.Node)]
        self.constants = [(i, x) for i, x in enumerate(leaves) if not isinstance(x, fx.Node)]
        flag = [k for k, i in enumerate(self.lane_pos) if leaves[i] is first_node]
        self.flag_lane = flag[0] if flag else None

    def rebuild(self, lane_values):
        """The call's (args, kwargs) with these values in the node arguments' places."""
        leaves = [None] * len(self.leaves)
        for i, v in zip(self.lane_pos, lane_values):
            leaves[i] = v
        for i, v in self.constants:
            leaves[i] = v
        return tree_unflatten(leaves, self.spec)


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
