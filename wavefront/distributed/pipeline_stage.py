"""One pipeline stage of a captured segment model: which layers a rank holds, what it receives
from the rank before and sends to the rank after, the parts of the captured graph it runs, and
the materialisation of its own weights when the model was built on the meta device.

Everything is read off the RecurrenceGraph (node.meta["wavefront"]["cell_layer"] says which layer
cell runs each node): a stage holding layers [a, b) runs the cells of those layers, receives the
values computed by cells below a that its cells (or later ranks') read, and sends on the values
computed below b that cells from b on read. The part before the first layer belongs to layer 0's
cell (rank 0), the part after the top layer to the top layer's cell (the last rank).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from wavefront.passes.dependence import analyse
from wavefront.passes.graph_parts import Part, compile_part
from wavefront.scheduler.capture import get_attr_path
from wavefront.scheduler.recurrence_graph import RecurrenceGraph


class PipelineNotSupported(ValueError):
    """This model (or this use) cannot run as a pipeline; the message says why."""


def cell_layer(node: fx.Node):
    return node.meta.get("wavefront", {}).get("cell_layer")


def layer_costs(rg: RecurrenceGraph) -> list[int]:
    """Parameter count per layer cell: the layer module's and those of the modules and attributes
    its cell reads besides (the embedding on layer 0, the head on the top layer)."""
    costs, seen = [0] * rg.n_layers, set()
    for l, layer in enumerate(rg.cell.layers):
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                costs[l] += p.numel()
    for l, tensors in enumerate(cell_tensors(rg, l) for l in range(rg.n_layers)):
        for t in tensors:
            if id(t) not in seen and isinstance(t, nn.Parameter):
                seen.add(id(t))
                costs[l] += t.numel()
    return costs


def choose_split(costs: list[int], n_stages: int) -> list[int]:
    """Layers per stage, contiguous, at least one each, minimising the largest stage's cost.

    >>> choose_split([10, 1, 1, 10], 2), choose_split([5, 5, 5], 3)
    ([2, 2], [1, 1, 1])
    """
    L = len(costs)
    if n_stages > L:
        raise PipelineNotSupported(f"{n_stages} pipeline stages for {L} layers: each stage needs one layer at least "
                                   "(use a smaller process group)")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    best = {(0, 0): (0, None)}  # (stages used, layers covered) -> (max cost, previous layers covered)
    for k in range(1, n_stages + 1):
        for j in range(k, L - (n_stages - k) + 1):
            options = [(max(best[(k - 1, i)][0], prefix[j] - prefix[i]), i) for i in range(k - 1, j)
                       if (k - 1, i) in best]
            best[(k, j)] = min(options)
    sizes, j = [], L
    for k in range(n_stages, 0, -1):
        i = best[(k, j)][1]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def check_split(split, n_layers: int, n_stages: int) -> list[int]:
    split = list(split)
    if len(split) != n_stages or any(not isinstance(n, int) or n < 1 for n in split) or sum(split) != n_layers:
        raise PipelineNotSupported(f"split={split} must give each of the {n_stages} ranks one layer or more, "
                                   f"{n_layers} layers in all")
    return split


def cell_tensors(rg: RecurrenceGraph, l: int) -> list[torch.Tensor]:
    """The parameters and buffers layer cell l runs with: its layer module's, those of the other
    modules its nodes call, and the attributes its nodes read."""
    out, cell = [], rg.cell
    for n in rg.graph_module.graph.nodes:
        if n.op == "call_module" and cell_layer(n) == l:
            m = cell.get_submodule(n.target)
            out += [*m.parameters(), *m.buffers()]
        elif n.op == "get_attr" and any(cell_layer(u) == l for u in n.users):
            v = get_attr_path(cell, n.target)
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def check_pipelinable(rg: RecurrenceGraph, ranges: list[range]) -> None:
    """Refuse a model whose memory crosses stages: the diagonal verdict first (RMT's top-to-first
    edge), then any state tensor read or written on more than one stage."""
    verdict = analyse(rg)
    if not verdict.diagonal_legal:
        raise PipelineNotSupported(f"{rg.family} cannot run as a pipeline (stage = layer group, micro-batch = "
                                   f"segment): {verdict.reason}")
    stage_of = {l: r for r, layers in enumerate(ranges) for l in layers}
    for j, out in enumerate(rg.state_out_nodes):
        nodes = [out] + ([rg.state_in_nodes[j], *rg.state_in_nodes[j].users] if rg.state_in_nodes[j] is not None else [])
        stages = {stage_of[cell_layer(n)] for n in nodes if cell_layer(n) is not None}
        if len(stages) > 1:
            raise PipelineNotSupported(f"state '{rg.state_names[j]}' is read or written by layers on stages "
                                       f"{sorted(stages)}: each stage carries only its own layers' memory; choose a "
                                       "split that keeps the layers sharing it on one stage")


def boundary(rg: RecurrenceGraph, b: int) -> list[fx.Node]:
    """The values computed by cells below layer b that cells from b on read (and the logits when
    computed below b): what stage [.., b) sends to the next."""
    out = []
    for n in rg.graph_module.graph.nodes:
        cl = cell_layer(n)
        if cl is None or cl >= b or n.op in ("placeholder", "get_attr"):
            continue
        if n is rg.logits_node or any(cell_layer(u) is not None and cell_layer(u) >= b for u in n.users):
            out.append(n)
    return out


@dataclass
class CellRun:
    """Layer l's cell: bind its state inputs, run the part before its layer call, call the user's
    own layer module, run the part after."""

    layer: int
    state_in: list[tuple[fx.Node, int]]
    before: Part
    node: fx.Node
    module: nn.Module
    after: Part

    def run(self, env: dict, state: dict) -> None:
        for node, j in self.state_in:
            env[node] = state[j]
        self.before.run(env)
        get = env.__getitem__
        env[self.node] = self.module(*fx.node.map_arg(self.node.args, get), **fx.node.map_arg(self.node.kwargs, get))
        self.after.run(env)


@dataclass
class StagePlan:
    """What one rank runs (see the module docstring)."""

    rank: int
    n_stages: int
    layers: range
    cells: list[CellRun]
    receives: list[fx.Node]  # from the previous rank, in this order
    sends: list[fx.Node]  # to the next rank, in this order
    states: list[int]  # the memory leaves this stage carries
    params: list[tuple[fx.Node, object]]  # get_attr nodes read directly by a layer call

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.n_stages - 1


def plan_stage(rg: RecurrenceGraph, ranges: list[range], rank: int) -> StagePlan:
    layers = ranges[rank]
    gm = rg.graph_module
    state_of = {n: j for j, n in enumerate(rg.state_in_nodes) if n is not None}
    cells = []
    for l in layers:
        owned = [n for n in gm.graph.nodes if cell_layer(n) == l and n not in state_of]
        node = rg.layer_nodes[l]
        if node.op != "call_module":
            raise PipelineNotSupported(f"layer {l} is not called as a module in the captured cell ({node.op})")
        cut = owned.index(node)
        cells.append(CellRun(l, [(n, j) for n, j in state_of.items() if cell_layer(n) == l],
                             compile_part(gm, owned[:cut], f"Stage{rank}Cell{l}Before"), node,
                             rg.cell.get_submodule(node.target), compile_part(gm, owned[cut + 1:], f"Stage{rank}Cell{l}After")))
    states = [j for j, n in enumerate(rg.state_out_nodes) if cell_layer(n) in layers]
    direct = [a for c in cells for a in c.node.all_input_nodes if a.op == "get_attr"]
    params = [(n, get_attr_path(gm, n.target)) for n in dict.fromkeys(direct)]
    last = rank == len(ranges) - 1
    return StagePlan(rank, len(ranges), layers, cells, boundary(rg, layers.start) if rank else [],
                     [] if last else boundary(rg, layers.stop), states, params)


def materialise(model: nn.Module, tensors: list[torch.Tensor], weights, device) -> None:
    """Replace the meta tensors among `tensors` (this rank's parameters and buffers) by real ones
    on `device` (torch.empty_like, as Module.to_empty does), filled from `weights` (a mapping of the
    model's parameter and buffer names, as named_parameters() / named_buffers() give them, to
    tensors: a state_dict plus any non-persistent buffer). Other ranks' tensors stay on meta."""
    wanted = {id(t) for t in tensors if t.is_meta}
    if not wanted:
        return
    if weights is None:
        raise PipelineNotSupported("the model is on the meta device: pass weights= (a mapping of its parameter and "
                                   "buffer names to tensors, e.g. a state_dict plus its non-persistent buffers) so "
                                   "each rank can fill in its own layers")
    done: dict[int, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for table in (module._parameters, module._buffers):
            for key, t in list(table.items()):
                if t is None or id(t) not in wanted:
                    continue
                name = f"{prefix}.{key}" if prefix else key
                if id(t) not in done:
                    if name not in weights:
                        raise PipelineNotSupported(f"weights= has no entry {name!r}, which this rank needs (its "
                                                   "layers' parameters and buffers, non-persistent ones included)")
                    src = weights[name]
                    if tuple(src.shape) != tuple(t.shape):
                        raise PipelineNotSupported(f"weights[{name!r}] has shape {tuple(src.shape)}, the model's "
                                                   f"is {tuple(t.shape)}")
                    real = torch.empty_like(t, device=device)
                    with torch.no_grad():
                        real.copy_(src)
                    if isinstance(t, nn.Parameter):
                        real = nn.Parameter(real, requires_grad=t.requires_grad)
                    done[id(t)] = real
                table[key] = done[id(t)]


__all__ = ["CellRun", "PipelineNotSupported", "StagePlan", "boundary", "cell_tensors", "check_pipelinable",
           "check_split", "choose_split", "layer_costs", "materialise", "plan_stage"]
