"""LaneSignature: how a layer call's arguments split into per-lane tensors and shared values."""
from __future__ import annotations

from torch import fx
from torch.utils._pytree import tree_flatten, tree_unflatten


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
