"""Lane folding: a graph rewrite that batches layers of one kind with (almost) no extra ops.

A layer cell treats batch rows independently, so the lanes of a diagonal step can be folded
into the batch dimension: rows [lane 0 batch; lane 1 batch; ...]. Every op that does not
touch a parameter then runs unchanged on lanes * batch rows; only parameter uses change:
  - nn.Linear            -> lane_linear: one baddbmm over the lane-stacked weights;
  - param (op) activation -> lane_elementwise: the param slice broadcast per lane;
  - buffers equal in every layer (rotary tables) stay as they are.
Anything else (a foreign block with parameters, a param in a non-elementwise op) raises
FoldNotApplicable and the kind is batched with vmap instead. torch.func.vmap does the same job
generally but pays a per-op dispatch cost that dominates small layers on CPU (an 8-lane vmap
step measured 3.3x a single cell; the folded graph about 1.4x). fold_cell.py runs the result.
"""
from __future__ import annotations

import inspect
import operator

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten
from wavefront.passes.lanes.block_clones import LaneBlock
from wavefront.passes.lanes.ops import (
    FoldNotApplicable,
    lane_elementwise,
    lane_linear,
    lane_row_flag,
)

_ELEMENTWISE_FUNCS = {operator.mul: "mul", operator.add: "add", operator.sub: "sub", operator.truediv: "truediv",
                      torch.mul: "mul", torch.add: "add", torch.sub: "sub", torch.div: "truediv",
                      torch.maximum: "maximum", torch.minimum: "minimum"}
_ELEMENTWISE_METHODS = {"mul": operator.mul, "add": operator.add, "sub": operator.sub, "div": operator.truediv}


def linear_groups(template: fx.GraphModule) -> list[list[str]]:
    """Linear modules that read the same value (q/k/v, gate/up, the memory's k/v/beta): each
    group can run as one wider matmul over a joint parameter storage."""
    by_input: dict = {}
    for n in template.graph.nodes:
        if n.op != "call_module" or n.kwargs or len(n.args) != 1 or not isinstance(n.args[0], fx.Node):
            continue
        m = template.get_submodule(n.target)
        if isinstance(m, nn.Linear):
            key = (n.args[0], m.in_features, m.weight.dtype, m.bias is not None)
            by_input.setdefault(key, []).append(n.target)
    return [targets for targets in by_input.values() if len(targets) > 1]


def joint_names(groups: list[list[str]], template: fx.GraphModule) -> list[list[str]]:
    """The tensor-name groups a ParameterStack stores jointly for `linear_groups`' groups."""
    out = []
    for targets in groups:
        out.append([f"{t}.weight" for t in targets])
        if template.get_submodule(targets[0]).bias is not None:
            out.append([f"{t}.bias" for t in targets])
    return out


def _tensors_of(module: nn.Module):
    return list(module.parameters(recurse=True)) + list(module.buffers(recurse=True))


def lane_invariant_buffers(template: fx.GraphModule, stack) -> set[str]:
    """Buffers (never parameters: those train apart) that hold the same values in every layer."""
    buffers = {n for n, _ in template.named_buffers()}
    return {n for n in buffers if all(torch.equal(stack.stacks[n][i], stack.stacks[n][0])
                                      for i in range(stack.stacks[n].shape[0]))}


def fold_graph(template: fx.GraphModule, stack_names, invariant: set[str],
               flag_placeholder: int | None = None, fused: list[list[str]] = ()) -> tuple[fx.GraphModule, list[str], list[str]]:
    """Rewrite `template` into the lane-folded graph.

    Returns the GraphModule (inputs: the template's own, then one per stacked tensor, then
    `lanes`), the stacked names it takes in order, and the tag ("B" rows / "P" stacked) of each
    output leaf. Placeholder number `flag_placeholder` is the first-segment flag: it arrives
    per row and may only be torch.where's condition. `fused`: groups of linears (linear_groups)
    whose weights (and biases) sit in joint storages `joint{k}`, in joint_names' order.
    """
    fused_of: dict[str, tuple[int, int | None, int]] = {}  # target -> (weight joint, bias joint, group)
    k = 0
    for gi, targets in enumerate(fused):
        has_bias = template.get_submodule(targets[0]).bias is not None
        for t in targets:
            fused_of[t] = (k, k + 1 if has_bias else None, gi)
        k += 2 if has_bias else 1
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    tag: dict[fx.Node, str] = {}  # "B": folded rows, "P": lane-stacked param value, "U": lane invariant
    placeholders = [n for n in template.graph.nodes if n.op == "placeholder"]
    for n in placeholders:
        env[n] = g.placeholder(n.target, default_value=n.args[0] if n.args else inspect.Signature.empty)
        env[n].meta = dict(n.meta)
        tag[n] = "B"
    flag = placeholders[flag_placeholder] if flag_placeholder is not None else None
    if flag is not None:
        tag[flag] = "F"
        for u in flag.users:
            if not (u.op == "call_function" and u.target is torch.where and len(u.args) == 3 and u.args[0] is flag
                    and flag not in u.args[1:] and not u.kwargs):
                raise FoldNotApplicable(f"the first-segment flag is used as `{u.format_node()}`, not as torch.where's condition")
    param_inputs: dict[str, fx.Node] = {}
    lane_blocks: dict[str, nn.Module] = {}
    fused_out: dict[int, fx.Node] = {}
    stacked = set(stack_names)
    # create param placeholders lazily but placeholders must precede other nodes: collect first
    needed = []
    for n in template.graph.nodes:
        if n.op == "get_attr" and n.target in stacked and n.target not in invariant:
            needed.append(n.target)
        elif n.op == "call_module":
            m = template.get_submodule(n.target)
            if isinstance(m, nn.Linear) and n.target in fused_of:
                wk, bk, _ = fused_of[n.target]
                needed += [f"joint{wk}"] + ([f"joint{bk}"] if bk is not None else [])
            elif isinstance(m, nn.Linear):
                needed += [f"{n.target}.weight"] + ([f"{n.target}.bias"] if m.bias is not None else [])
            elif _tensors_of(m):  # an opaque block: all its non-invariant tensors, for its lane clone
                needed += [k for k in stack_names if k.startswith(n.target + ".") and k not in invariant]
    for name in dict.fromkeys(needed):
        # defaults keep the signature valid after the template's own defaulted inputs (always passed by name)
        param_inputs[name] = g.placeholder("lane_" + name.replace(".", "_"), default_value=None)
    lanes = g.placeholder("lanes", default_value=None)

    def arg(a):
        return fx.node.map_arg(a, lambda x: env[x])

    def tags_of(node):
        return [tag[a] for a in node.all_input_nodes]

    for n in template.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            leaves, spec = tree_flatten(n.args[0])
            out_tags = [tag[x] if isinstance(x, fx.Node) else "U" for x in leaves]
            if "U" in out_tags:
                raise FoldNotApplicable("a layer output does not depend on the layer's inputs")
            g.output(arg(n.args[0]))
            break
        if n.op == "get_attr":
            if n.target in param_inputs:
                env[n], tag[n] = param_inputs[n.target], "P"
            else:
                env[n], tag[n] = g.get_attr(n.target), "U"
            continue
        ins = tags_of(n)
        if "F" in ins:  # torch.where(flag, a, b): the per-row flag shaped like the selected values
            a, b = n.args[1], n.args[2]
            like = next((x for x in (a, b) if isinstance(x, fx.Node) and tag[x] == "B"), None)
            if like is None or "P" in ins:
                raise FoldNotApplicable(f"`{n.format_node()}` selects between values that are not per row")
            cond = g.call_function(lane_row_flag, (env[flag], env[like]))
            env[n] = g.call_function(torch.where, (cond, arg(a), arg(b)))
            tag[n] = "B"
            continue
        if n.op == "call_module":
            m = template.get_submodule(n.target)
            if isinstance(m, nn.Linear) and n.target in fused_of:
                if "P" in ins:
                    raise FoldNotApplicable(f"linear {n.target} is applied to a parameter")
                wk, bk, gi = fused_of[n.target]
                if gi not in fused_out:  # the group's first linear computes all of them at once
                    fused_out[gi] = g.call_function(lane_linear, (arg(n.args[0]), param_inputs[f"joint{wk}"],
                                                                  param_inputs.get(f"joint{bk}"), lanes))
                off = sum(template.get_submodule(t).out_features for t in fused[gi][:fused[gi].index(n.target)])
                env[n] = g.call_method("narrow", (fused_out[gi], -1, off, m.out_features))
                tag[n] = "B"
                continue
            if isinstance(m, nn.Linear):
                if "P" in ins:
                    raise FoldNotApplicable(f"linear {n.target} is applied to a parameter")
                w = param_inputs[f"{n.target}.weight"]
                b = param_inputs.get(f"{n.target}.bias")
                env[n] = g.call_function(lane_linear, (arg(n.args[0]), w, b, lanes))
                tag[n] = "B"
                continue
            if _tensors_of(m):  # an opaque block with parameters: run its lane clone (module_fold.py)
                if "P" in ins:
                    raise FoldNotApplicable(f"module {n.target} is applied to a parameter")
                clone_name = "lane_" + n.target.replace(".", "_")
                lane_blocks[clone_name] = LaneBlock(m, n.target + ".", invariant)
                mine = {k: param_inputs[k] for k in param_inputs if k.startswith(n.target + ".")}
                env[n] = g.call_module(clone_name, arg(n.args), {**arg(n.kwargs), "lane_params": mine, "lanes": lanes})
                tag[n] = "B"
                continue
            env[n] = g.call_module(n.target, arg(n.args), arg(n.kwargs))
            tag[n] = "B" if "B" in ins else ("P" if "P" in ins else "U")
            if tag[n] == "P":
                raise FoldNotApplicable(f"module {n.target} is applied to a parameter")
            continue
        if "P" not in ins:
            env[n] = g.node_copy(n, lambda x: env[x])
            tag[n] = "B" if "B" in ins else "U"
            continue
        op = n.target if n.op == "call_function" else _ELEMENTWISE_METHODS.get(n.target)
        args = list(n.args)
        if op in _ELEMENTWISE_FUNCS and len(args) == 2 and not n.kwargs:
            a, b = args
            ta = tag.get(a) if isinstance(a, fx.Node) else "U"
            tb = tag.get(b) if isinstance(b, fx.Node) else "U"
            if {ta, tb} == {"P", "B"}:
                param_first = ta == "P"
                x, p = (b, a) if param_first else (a, b)
                env[n] = g.call_function(lane_elementwise, (_ELEMENTWISE_FUNCS[op], env[x], env[p], lanes, param_first))
                tag[n] = "B"
                continue
            if (ta, tb) in (("P", "U"), ("U", "P")) and not any(isinstance(v, fx.Node) and tag[v] == "U" for v in (a, b)):
                env[n] = g.node_copy(n, lambda x: env[x])  # param (op) python scalar stays stacked
                tag[n] = "P"
                continue
        raise FoldNotApplicable(f"`{n.format_node()}` uses layer parameters in a way lane folding cannot batch")
    root = nn.Module()
    for name, _ in template.named_children():
        setattr(root, name, getattr(template, name))
    for name, value in template.__dict__.get("_buffers", {}).items():
        root.register_buffer(name, value)
    for name, block in lane_blocks.items():
        setattr(root, name, block)
    for n in g.nodes:  # attributes read by get_attr must exist on the root
        if n.op == "get_attr" and "." not in n.target and not hasattr(root, n.target):
            setattr(root, n.target, getattr(template, n.target))
    gm = fx.GraphModule(root, g, class_name="LaneFolded" + type(template).__name__)
    return gm, list(param_inputs), out_tags
