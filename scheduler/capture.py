"""capture(model) -> RecurrenceGraph: trace the recurrent cell with torch.fx and find its wiring.

Two traces: the cell with every layer kept as one call (the layer-level dataflow: what goes
layer to layer, which state output feeds which state input next segment), then each layer on
its own (its graph, and whether layers are structurally the same). Nothing is traced with
concrete_args, so no example input is baked in as a constant, and nothing depends on the
segment length: one graph serves every segment, the short last one included.
"""
from __future__ import annotations

import inspect
import operator
import os
import traceback

import torch
from torch import fx, nn
from torch.utils._pytree import (
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_unflatten,
)
from wavefront.scheduler.adapters import bind_model
from wavefront.scheduler.recurrence_graph import (
    RecurrenceGraph,
    RecurrenceStructure,
    StateLink,
)

from wavefront.models.opaque import OpaqueModule


class CaptureError(RuntimeError):
    """A model could not be captured; the message names the module and the operation."""


class _CellTracer(fx.Tracer):
    """Keeps OpaqueModules and the given layer modules as single calls; remembers where it is."""

    def __init__(self, leaves=()):
        super().__init__()
        self._leaves = {id(m) for m in leaves}
        self._wf_stack: list[tuple[str, str]] = []
        self.traced_through: list[nn.Module] = []  # modules whose Python ran at trace time (not leaves)

    def is_leaf_module(self, m, qualname):
        return id(m) in self._leaves or isinstance(m, OpaqueModule) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        if not self.is_leaf_module(m, path):
            self.traced_through.append(m)
        self._wf_stack.append((path, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._wf_stack.pop()


_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_frame(exc: BaseException) -> str:
    """The innermost frame outside torch: where in the model's code tracing failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    if not frames:
        return "inside torch"
    f = frames[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno}: {(f.line or '').strip()}"


def trace_module(root: nn.Module, leaves=(), what: str = "", traced: list | None = None,
                 concrete_args: dict | None = None) -> fx.GraphModule:
    """Symbolically trace `root` (layers in `leaves` and OpaqueModules kept whole) or raise a
    CaptureError naming the module being traced and the failing operation. `traced`, if given,
    receives the modules whose code the trace ran (root included). `concrete_args` as torch.fx
    takes them (fx.PH leaves become one placeholder each)."""
    tracer = _CellTracer(leaves)
    try:
        graph = tracer.trace(root, concrete_args=concrete_args)
    except Exception as exc:  # FX reports data-dependent control flow etc. as various error types
        where = tracer._wf_stack[-1] if tracer._wf_stack else ("", type(root).__name__)
        path = f"{what}.{where[0]}" if where[0] else what or "<root>"
        raise CaptureError(
            f"cannot capture module '{path}' ({where[1]}): operation `{_user_frame(exc)}` failed under torch.fx "
            f"tracing: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Recurrent cells must "
            "not branch on tensor values or shapes; wrap such code in an OpaqueModule to keep it as one call"
        ) from exc
    if traced is not None:
        traced += [root, *tracer.traced_through]
    return fx.GraphModule(root, graph, class_name=type(root).__name__ + "Graph")


def get_attr_path(root: nn.Module, target: str):
    """The object a get_attr node names (a parameter, buffer or constant, dotted path)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _structural_key(gm: fx.GraphModule):
    """Graph shape with parameter names replaced by (type, shapes): equal keys = same layer kind."""
    index = {}
    key = []

    def arg_key(a):
        return fx.node.map_aggregate(a, lambda x: ("%", index[x]) if isinstance(x, fx.Node) else x)

    for i, n in enumerate(gm.graph.nodes):
        index[n] = i
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            tgt = (type(m).__qualname__, tuple((k, tuple(v.shape), v.dtype) for k, v in m.state_dict().items()))
        elif n.op == "get_attr":
            v = get_attr_path(gm, n.target)
            tgt = (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v)
        elif n.op in ("call_function",):
            tgt = getattr(n.target, "__qualname__", repr(n.target))
        else:
            tgt = n.target if n.op != "placeholder" else "arg"
        key.append((n.op, tgt, arg_key(n.args), arg_key(tuple(sorted(n.kwargs.items())))))
    return repr(tuple(key))  # repr: slices in args are unhashable before Python 3.12


def _group_kinds(keys) -> tuple[int, ...]:
    seen: dict = {}
    return tuple(seen.setdefault(k, len(seen)) for k in keys)


def _check_signature(cell: nn.Module, family: str):
    params = list(inspect.signature(cell.forward).parameters)
    if len(params) != 3:
        raise CaptureError(f"{family}: the segment cell's forward must be (input_ids, first, state), got ({', '.join(params)})")
    if not isinstance(getattr(cell, "layers", None), nn.ModuleList) or len(cell.layers) == 0:
        raise CaptureError(f"{family}: the segment cell must have a non-empty nn.ModuleList `layers`")


def capture(model: nn.Module) -> RecurrenceGraph:
    """Capture a segment-recurrent model's cell as a RecurrenceGraph.

    >>> from wavefront.models import ARMT, ARMTConfig
    >>> rg = capture(ARMT(ARMTConfig(n_layers=3)))
    >>> rg.n_layers, [(l.producer, l.consumers) for l in rg.structure.state_links][:2]
    (3, [(0, (0,)), (0, (0,))])
    """
    bound = bind_model(model)
    cell = bound.cell
    _check_signature(cell, bound.family)
    layers = list(cell.layers)
    traced: list[nn.Module] = []
    # The state goes in as one placeholder per tensor, in the structure initial_state gives (a
    # tuple, per-layer tuples, a dict...): the cell's own code may index it, unpack it or zip it
    # with the layers, which a single Proxy would not allow.
    leaves, state_spec = tree_flatten(cell.initial_state(1, torch.float32, "cpu"))
    n_state = len(leaves)
    state_arg = list(inspect.signature(cell.forward).parameters)[2]
    gm = trace_module(cell, leaves=layers, what="cell", traced=traced,
                      concrete_args={state_arg: tree_unflatten([fx.PH] * n_state, state_spec)})
    _expose_state_leaves(gm, state_spec)
    layer_graphs = tuple(trace_module(layer, what=f"cell.layers.{i}", traced=traced) for i, layer in enumerate(layers))
    wiring = _analyse_cell_graph(gm, len(layers), n_state, bound.family)
    names = tuple(cell.state_names()) if hasattr(cell, "state_names") else _state_paths(state_spec)
    links = tuple(StateLink(j, names[j], wiring["producers"][j], wiring["consumers"][j]) for j in range(n_state))
    structure = RecurrenceStructure(len(layers), wiring["hidden_links"], links)
    return RecurrenceGraph(
        family=bound.family, adapter=bound.adapter, cell=cell, segment_len=bound.segment_len, graph_module=gm,
        layer_graphs=layer_graphs, layer_nodes=wiring["layer_nodes"], state_in_nodes=wiring["state_in"],
        state_out_nodes=wiring["state_out"], logits_node=wiring["logits"], input_node=wiring["input"],
        first_node=wiring["first"], structure=structure, state_spec=wiring["state_spec"],
        layer_kinds=_group_kinds(_structural_key(g) for g in layer_graphs), state_names=names,
        traced_modules=tuple(dict.fromkeys(traced)))


def _expose_state_leaves(gm: fx.GraphModule, state_spec) -> None:
    """Where the returned state holds one node standing for a container (a layer returned its
    (A, z) and the cell passed it on whole), take its items out with getitem nodes, shaped like
    initial_state's structure, so that every state tensor is a node of its own."""
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out = tree_unflatten(list(out_node.args[0]), gm._out_spec)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        return  # the contract check says what is wrong

    def expand(value, like):
        if isinstance(like, (tuple, list, dict)) and isinstance(value, fx.Node):
            keys = list(like) if isinstance(like, dict) else range(len(like))
            with gm.graph.inserting_before(out_node):
                items = {k: gm.graph.call_function(operator.getitem, (value, k)) for k in keys}
            value = dict(items) if isinstance(like, dict) else type(like)(items.values())
        if isinstance(like, dict) and isinstance(value, dict) and value.keys() == like.keys():
            return {k: expand(value[k], like[k]) for k in like}
        if isinstance(like, (tuple, list)) and isinstance(value, (tuple, list)) and len(value) == len(like):
            return type(like)(expand(v, l) for v, l in zip(value, like))
        return value

    state = expand(out[1], tree_unflatten([None] * state_spec.num_leaves, state_spec))
    flat, spec = tree_flatten((out[0], state))
    out_node.args = (type(out_node.args[0])(flat),)
    gm.graph._codegen.pytree_info = gm.graph._codegen.pytree_info._replace(out_spec=spec)
    gm.recompile()


def _state_paths(spec) -> tuple[str, ...]:
    """Names of the state leaves from their place in the structure: state[0][1], state['mem']..."""
    paths, _ = tree_flatten_with_path(tree_unflatten([0] * spec.num_leaves, spec))
    return tuple("state" + keystr(p) for p, _ in paths)


def _analyse_cell_graph(gm: fx.GraphModule, n_layers: int, n_state: int, family: str) -> dict:
    """Assign every node to the layer cell that runs it and read off the wiring.

    A layer call belongs to its layer; a node fed by layer outputs belongs to the latest of
    those layers (it can run as soon as they have); a node fed only by inputs and parameters
    (embedding, memory tokens, masks) belongs to the earliest layer that needs it.
    """
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    input_node, first_node, state_in = placeholders[0], placeholders[1], tuple(placeholders[2:])
    if len(state_in) != n_state:
        raise CaptureError(f"{family}: the cell's forward must take (input_ids, first, state) only")
    layer_of = {f"layers.{i}": i for i in range(n_layers)}
    layer_nodes = [None] * n_layers
    for n in nodes:
        if n.op == "call_module" and n.target in layer_of:
            if layer_nodes[layer_of[n.target]] is not None:
                raise CaptureError(f"{family}: layer {n.target} is called more than once per segment")
            layer_nodes[layer_of[n.target]] = n
    for i, n in enumerate(layer_nodes):
        if n is None:
            raise CaptureError(f"{family}: layer layers.{i} is never called by the cell")

    out_node = next(n for n in reversed(nodes) if n.op == "output")
    out = tree_unflatten(list(out_node.args[0]), gm._out_spec)  # the cell's return value, as nodes
    state_leaves, state_spec = tree_flatten(out[1]) if isinstance(out, (tuple, list)) and len(out) == 2 else ([], None)
    if not (state_spec is not None and isinstance(out[0], fx.Node) and len(state_leaves) == n_state
            and all(isinstance(x, fx.Node) for x in state_leaves)):
        raise CaptureError(f"{family}: the cell must return (logits, new_state) with new_state holding "
                           f"{n_state} tensors like initial_state's, got {out}")
    logits, state_out = out[0], tuple(state_leaves)

    owner: dict = {}
    for n in nodes:  # forward pass: layer calls and nodes fed by layers
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        if n in layer_nodes:
            owner[n] = layer_nodes.index(n)
            continue
        fed_by = [owner[a] for a in n.all_input_nodes if owner.get(a) is not None]
        owner[n] = max(fed_by) if fed_by else None
    for n in reversed(nodes):  # backward pass: input-only nodes (state too) go to their earliest consumer
        if n.op in ("get_attr", "output") or (n.op == "placeholder" and n not in state_in) \
                or owner.get(n) is not None:
            continue
        users = [owner.get(u) for u in n.users if owner.get(u) is not None]
        owner[n] = min(users) if users else (None if n in state_in else n_layers - 1)

    after_layer = set()
    for n in nodes:
        if n in layer_nodes or any(a in after_layer for a in n.all_input_nodes):
            after_layer.add(n)
    feeds_layer = set()
    for n in reversed(nodes):
        if n in layer_nodes or any(u in feeds_layer for u in n.users):
            feeds_layer.add(n)
    hidden = set()
    for n in nodes:
        if n in state_in:
            role = "state_in"
        elif n.op in ("placeholder", "output"):
            role = "input" if n.op == "placeholder" else "output"
        elif n.op == "get_attr":
            role = "param"
        elif n in layer_nodes:
            role = "layer"
        elif n not in after_layer:
            role = "pre"
        else:
            role = "glue" if n in feeds_layer else "post"
        n.meta["wavefront"] = {"cell_layer": owner.get(n), "role": role}
        if owner.get(n) is not None:
            for a in n.all_input_nodes:
                k = owner.get(a)
                if k is not None and k != owner[n] and a not in state_in:
                    hidden.add((k, owner[n]))

    producers, consumers = [], []
    for j, n in enumerate(state_out):
        if n.op in ("placeholder", "get_attr") or owner.get(n) is None:
            raise CaptureError(f"{family}: state output {j} (`{n.format_node()}`) is not computed by any layer; "
                               "state that is carried unchanged or constant is not supported")
        producers.append(owner[n])
        users = state_in[j].users
        consumers.append(tuple(sorted({owner[u] for u in users if owner.get(u) is not None})))
    return dict(layer_nodes=tuple(layer_nodes), state_in=state_in, state_out=state_out, logits=logits,
                state_spec=state_spec,
                input=input_node, first=first_node, hidden_links=tuple(sorted(hidden)),
                producers=producers, consumers=consumers)
