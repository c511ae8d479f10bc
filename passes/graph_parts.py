"""Compile a cell's share of the captured graph into small GraphModules.

capture() assigns every node of the cell graph to the layer cell that runs it. Per layer, the
nodes before its layer call (embedding, memory tokens, glue) and after it (output unpacking,
final norm and head) become two GraphModules whose inputs are the values they read from
elsewhere and whose outputs are the values others read. Running generated code instead of
interpreting node by node keeps the per-cell overhead near that of the model's own forward.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

from torch import fx


@dataclass
class Part:
    """Compiled nodes: call(*[env[x] for x in inputs]) -> values of `outputs`, in order.
    `unpack`: the part only takes items out of one tuple (a layer's outputs), done directly."""

    module: fx.GraphModule | None
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    unpack: list[tuple[fx.Node, fx.Node, int]] | None = None

    def run(self, env: dict) -> None:
        if self.unpack is not None:
            for node, source, index in self.unpack:
                env[node] = env[source][index]
            return
        if self.module is None:
            return
        values = self.module(*[env[x] for x in self.inputs])
        for node, value in zip(self.outputs, values):
            env[node] = value


def compile_part(root: fx.GraphModule, nodes: list[fx.Node], name: str) -> Part:
    """A GraphModule computing `nodes` (in graph order) from whatever they read outside."""
    if not nodes:
        return Part(None, [], [])
    if all(n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)
           and isinstance(n.args[1], int) and n.args[0] not in nodes for n in nodes):
        return Part(None, [], list(nodes), unpack=[(n, n.args[0], n.args[1]) for n in nodes])
    members = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in members and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    return Part(subgraph(root, nodes, inputs, outputs, name), inputs, outputs)


def subgraph(root: fx.GraphModule, nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
             name: str) -> fx.GraphModule:
    """A GraphModule computing `outputs` (a tuple) from `inputs` (its placeholders, in order) by
    the `nodes` of `root` (in graph order); parameters and buffers are read from root in place."""
    g = fx.Graph()
    mapping = {a: g.placeholder(f"in_{i}") for i, a in enumerate(inputs)}

    def get(x):
        if x not in mapping:  # parameters and buffers are read in place
            mapping[x] = g.get_attr(x.target)
        return mapping[x]

    for n in nodes:
        if n not in mapping:
            mapping[n] = g.node_copy(n, get)
    g.output(tuple(mapping[o] for o in outputs))
    return fx.GraphModule(root, g, class_name=name)
