"""How a captured segment cell runs as one program under the diagonal schedule: the plan.

Read off the RecurrenceGraph, for any cell on the segment contract (not only ARMT):
  pre    the nodes before the first layer (embedding, memory tokens, masks, rotary tables): run
         once on every segment's rows at once, the segments folded into the batch;
  lanes  one batched call of the layer kind per step, lane l = layer l. Each layer-call input is
         the previous layer's output ("hidden"; lane 0 takes a pre value), one of the layer's own
         state tensors ("state"), the first-segment flag ("first"), or a pre value every layer
         reads alike ("ctx");
  post   the nodes after the top layer (final norm, head), run once on every segment's rows.
The state layout comes from the capture's state links: the p-th state input of layer l is state
leaf `state_index[l][p]`, and its new value is the layer's output leaf `state_out_leaf[p]`;
stacked over the layers it is one [L, ...] tensor of the program. Whether each pre value is per
row or the same for every segment is decided by `classify` on a real input (folding segments
into rows is checked, like lane folding is), never guessed from a shape at run time.

Anything else (glue computed between layers, a layer reading another layer's state, the pre
part reading the state or the flag, more than one layer kind) raises ProgramNotApplicable
naming what; such models run step by step, exactly.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_unflatten
from wavefront.passes.graph_parts import subgraph
from wavefront.passes.lanes.fold_cell import structural_mismatch
from wavefront.scheduler.recurrence_graph import RecurrenceGraph


class ProgramNotApplicable(Exception):
    """This model cannot run as one program (the reason says why); it runs step by step."""


@dataclass(frozen=True)
class LaneInput:
    """One per-lane value of the layer call. role: hidden (index: the previous layer's output
    leaf; pre: the pre output lane 0 reads), state (index: position p), first, ctx (pre: the pre
    output)."""

    role: str
    index: int = -1
    pre: int = -1


@dataclass(eq=False)
class SegmentPlan:
    """The parts and layouts a SegmentProgram runs (see the module docstring)."""

    n_layers: int
    pre: fx.GraphModule  # (input_ids rows) -> pre outputs
    lane_inputs: tuple[LaneInput, ...]  # in the layer signature's lane-value order
    state_index: tuple[tuple[int, ...], ...]  # [layer][position] -> state leaf
    state_out_leaf: tuple[int, ...]  # [position] -> the layer's output leaf with the new state
    post: fx.GraphModule  # post inputs -> (logits,)
    post_inputs: tuple[tuple[str, int], ...]  # ("top", output leaf) | ("pre", pre output) | ("input", 0)
    pre_rows: tuple[bool, ...] | None = None  # per pre output: per row (True) or one for all segments; classify()

    @property
    def hidden(self) -> list[tuple[int, LaneInput]]:
        return [(i, x) for i, x in enumerate(self.lane_inputs) if x.role == "hidden"]

    def stack_state(self, leaves) -> list[torch.Tensor]:
        return stack_state(leaves, self.state_index)

    def unstack_state(self, stacked) -> list[torch.Tensor]:
        return unstack_state(stacked, self.state_index)

    def classify(self, input_ids: torch.Tensor, segment_len: int) -> None:
        """Decide, on a real input of two or more rows and segments, which pre outputs are per
        row (folding segments into rows gives each segment's own value) and which are one for
        all segments; raise ProgramNotApplicable if any is neither."""
        B, T = input_ids.shape
        S = T // segment_len
        if B < 2 or S < 2:
            raise ValueError("classify needs an input of two or more rows and whole segments")
        segments = input_ids[:, :S * segment_len].reshape(B, S, segment_len)
        folded = self.pre(segments.transpose(0, 1).reshape(S * B, segment_len))
        each = [self.pre(segments[:, s]) for s in range(S)]
        rows = []
        for i, v in enumerate(folded):
            per = [e[i] for e in each]
            if not isinstance(v, torch.Tensor):  # a size or setting: must not depend on the segment
                if any(p != v for p in per):
                    raise ProgramNotApplicable(f"the part of the cell before the layers (output {i}) depends on how "
                                               "many rows it is given")
                rows.append(False)
            elif v.dim() and v.shape[0] == S * B and all(p.shape == (B, *v.shape[1:]) for p in per) \
                    and not structural_mismatch(v.reshape(S, B, *v.shape[1:]), torch.stack(per)):
                rows.append(True)
            elif all(p.shape == v.shape and not structural_mismatch(p, v) for p in per):
                rows.append(False)
            else:
                raise ProgramNotApplicable(f"the part of the cell before the layers (output {i}) is neither per row nor "
                                           "the same for every segment when segments are batched as rows")
        if any(not rows[x.pre] for _, x in self.hidden):
            raise ProgramNotApplicable("the first layer's input is not per row")
        self.pre_rows = tuple(rows)


def stack_state(leaves, state_index) -> list[torch.Tensor]:
    """The memory's leaves as one [L, ...] tensor per state position (`state_index[l][p]`: the
    leaf layer l holds at position p).

    >>> [t.tolist() for t in stack_state([torch.tensor(0), torch.tensor(1)], [[1], [0]])]
    [[1, 0]]
    """
    return [torch.stack([leaves[row[p]] for row in state_index]) for p in range(len(state_index[0]))]


def unstack_state(stacked, state_index) -> list[torch.Tensor]:
    """The memory's leaves, in the capture's order, from the stacked positions (stack_state's inverse)."""
    leaves = [None] * (len(state_index) * len(stacked))
    for p, t in enumerate(stacked):
        for l, v in enumerate(t.unbind(0)):
            leaves[state_index[l][p]] = v
    return leaves


def _leaf_path(node: fx.Node, root: fx.Node) -> tuple | None:
    """(k1, k2, ...) if node is root[k1][k2]... (a chain of getitems), else None."""
    path = []
    while node is not root:
        if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)):
            return None
        path.append(node.args[1])
        node = node.args[0]
    return tuple(reversed(path))


def _output_leaf(path: tuple, spec) -> int | None:
    """The flat index of a layer's output leaf reached by `path` through its output structure."""
    x = tree_unflatten(list(range(spec.num_leaves)), spec)
    try:
        for k in path:
            x = x[k]
    except (KeyError, IndexError, TypeError):
        return None
    return x if isinstance(x, int) else None


def _layer_output_spec(rg: RecurrenceGraph, l: int):
    out = next(n for n in reversed(rg.layer_graphs[l].graph.nodes) if n.op == "output")
    return tree_flatten(out.args[0])[1]


def _ancestors(targets, stop) -> list[fx.Node]:
    """Nodes the targets need, walking back and not past `stop` (a predicate) or get_attr."""
    seen, todo = set(), list(targets)
    while todo:
        n = todo.pop()
        if n in seen or n.op == "get_attr" or stop(n):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return list(seen)


def plan_segment_program(rg: RecurrenceGraph, signatures) -> SegmentPlan:
    """The plan for `rg`, or ProgramNotApplicable saying why not (see the module docstring).
    `signatures`: each layer's LaneSignature (passes/lanes/vmap_cell.py)."""
    L = rg.n_layers
    if len(set(rg.layer_kinds)) != 1:
        raise ProgramNotApplicable(f"the layer stack has {len(set(rg.layer_kinds))} layer kinds (a hybrid stack): one "
                                   "program runs one batched cell per step, so all layers must be of one kind")
    spec = _layer_output_spec(rg, 0)
    state_of = {n: j for j, n in enumerate(rg.state_in_nodes)}
    layer_of = {n: l for l, n in enumerate(rg.layer_nodes)}

    def leaf_of(node, l):  # the output leaf of layer l that `node` is, or None
        path = _leaf_path(node, rg.layer_nodes[l])
        return None if path is None else _output_leaf(path, spec)

    # lane inputs, layer by layer: the same role at each position for every layer
    per_layer = [[sig.leaves[i] for i in sig.lane_pos] for sig in signatures]
    if len({len(v) for v in per_layer}) != 1:
        raise ProgramNotApplicable("the layers are called with different numbers of inputs")
    lane_inputs, state_index = [], [[] for _ in range(L)]
    pre_targets: list[fx.Node] = []

    def pre_index(node):
        if node not in pre_targets:
            pre_targets.append(node)
        return pre_targets.index(node)

    for pos in range(len(per_layer[0])):
        values = [per_layer[l][pos] for l in range(L)]
        v0 = values[0]
        if v0 is rg.first_node:
            if any(v is not rg.first_node for v in values):
                raise ProgramNotApplicable(f"layer input {pos} is the first-segment flag for some layers only")
            lane_inputs.append(LaneInput("first"))
        elif v0 in state_of:
            if not all(v in state_of for v in values):
                raise ProgramNotApplicable(f"layer input {pos} is a state tensor for some layers only")
            for l, v in enumerate(values):
                state_index[l].append(state_of[v])
            lane_inputs.append(LaneInput("state", sum(1 for x in lane_inputs if x.role == "state")))
        elif L > 1 and all(v is v0 for v in values):
            lane_inputs.append(LaneInput("ctx", pre=pre_index(v0)))
        else:
            ks = {leaf_of(values[l], l - 1) for l in range(1, L)}
            if L > 1 and (len(ks) != 1 or None in ks):
                raise ProgramNotApplicable(f"layer input {pos} (`{values[-1].format_node()}` for the top layer) is "
                                           "neither the previous layer's output, the layer's own state, the flag, nor "
                                           "a value every layer reads alike")
            lane_inputs.append(LaneInput("hidden", ks.pop() if L > 1 else 0, pre_index(v0)))

    # the state layout: layer l reads its own state positions and writes them as output leaves
    n_pos = len(state_index[0])
    if sorted(j for row in state_index for j in row) != list(range(len(rg.state_in_nodes))):
        raise ProgramNotApplicable("the layers' state inputs do not cover each state tensor once")
    out_leaf = []
    for p in range(n_pos):
        ks = {leaf_of(rg.state_out_nodes[state_index[l][p]], l) for l in range(L)}
        if len(ks) != 1 or None in ks:
            raise ProgramNotApplicable(f"the new value of state input {p} is not one output of the layer that read it "
                                       "(computed between layers, or by another layer)")
        out_leaf.append(ks.pop())

    # pre: what lane 0 and the ctx values need, from input_ids alone
    def stop_pre(n):
        if n is rg.input_node:
            return True
        if n is rg.first_node or n in state_of or n in layer_of:
            raise ProgramNotApplicable(f"the part before the layers reads {'the first-segment flag' if n is rg.first_node else 'the state' if n in state_of else 'a layer'} "
                                       "(it runs once for every segment at once)")
        return False

    # post: what the logits need, from the top layer's outputs, pre values and input_ids
    top, post_inputs, post_nodes = rg.layer_nodes[L - 1], [], []

    def stop_post(n):
        if n is rg.input_node:
            post_inputs.append((n, ("input", 0)))
            return True
        k = leaf_of(n, L - 1) if n is not top else None
        if k is not None:
            post_inputs.append((n, ("top", k)))
            return True
        if n.meta.get("wavefront", {}).get("role") == "pre" and n not in state_of and n is not rg.first_node:
            post_inputs.append((n, ("pre", pre_index(n))))
            return True
        if n is rg.first_node or n in state_of or n in layer_of or any(leaf_of(n, l) is not None for l in range(L - 1)):
            raise ProgramNotApplicable(f"the part after the layers reads `{n.format_node()}` (only the top layer's "
                                       "outputs and input_ids can be batched over segments there)")
        return False

    post_nodes = _ancestors([rg.logits_node], stop_post)
    pre_nodes = _ancestors(pre_targets, stop_pre)
    order = {n: i for i, n in enumerate(rg.graph_module.graph.nodes)}
    gm = rg.graph_module
    pre = subgraph(gm, sorted(pre_nodes, key=order.get), [rg.input_node], list(pre_targets), "ProgramPre")
    inputs = list(dict.fromkeys(n for n, _ in post_inputs))
    roles = {n: r for n, r in post_inputs}
    post = subgraph(gm, sorted(post_nodes, key=order.get), inputs, [rg.logits_node], "ProgramPost")
    return SegmentPlan(L, pre, tuple(lane_inputs), tuple(tuple(r) for r in state_index), tuple(out_leaf), post,
                       tuple(roles[n] for n in inputs))


__all__ = ["LaneInput", "ProgramNotApplicable", "SegmentPlan", "plan_segment_program", "stack_state", "unstack_state"]
