"""The decode-step graph computes a segment's memory write only in the call that ends it.

A decode call that leaves its segment open hands the memory in back out unchanged, so what only the
written memory needs (each layer's write from its memory rows) is wasted work there, as in torch's
decode (wavefront/scheduler/logits_only.py). After the plain interface is in place
(decode_graph.give_decode_io: present_memory.<p> = Where(segment ends, written, memory in)), the
nodes that feed nothing but the written memory move into the then-branch of one ONNX If on the
same condition; its else-branch passes the memory in through. Only nodes no other output reaches
move, so the logits and the cache are computed by the same nodes as before.
"""
from __future__ import annotations

import onnx
from onnx import helper


def _producers(graph: onnx.GraphProto) -> dict:
    return {out: node for node in graph.node for out in node.output if out}


def _ancestors(names, producers: dict, skip=()) -> set:
    """ids of the nodes the values `names` are computed from (not through the nodes in `skip`)."""
    seen, stack = set(), [producers[n] for n in names if n in producers]
    while stack:
        node = stack.pop()
        if id(node) in seen or id(node) in skip:
            continue
        seen.add(id(node))
        stack += [producers[i] for i in _used_names(node) if i in producers]
    return seen


def _used_names(node) -> list:
    """A node's inputs and the outer values its subgraphs (a Scan body, an If branch) read."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in [*sub.input, *sub.initializer]}
            names += [i for n in sub.node for i in _used_names(n) if i not in inner]
    return names


def write_on_segment_end(proto: onnx.ModelProto, condition: str, presents: list[str]) -> int:
    """Move what only `presents`' written branch needs into an If on `condition`; returns how many
    nodes moved (0: nothing to move, the graph is left as it was). Each present must be made by
    Where(condition, written, passed) as give_decode_io writes it."""
    g = proto.graph
    producers = _producers(g)
    wheres = [producers[p] for p in presents]
    if not all(w.op_type == "Where" and w.input[0] == condition for w in wheres):
        return 0
    written, passed = [w.input[1] for w in wheres], [w.input[2] for w in wheres]
    others = [o.name for o in g.output if o.name not in presents]
    live = _ancestors(others + passed + [condition], producers, skip={id(w) for w in wheres})
    moving = _ancestors(written, producers) - live
    reads = {i for n in g.node for i in _used_names(n)}
    if not moving or reads & set(presents):  # a node reading a present would come before the If making it
        return 0
    replaced = moving | {id(w) for w in wheres}
    rest = [n for n in g.node if id(n) not in replaced]
    inner = [n for n in g.node if id(n) in moving]
    n_moved = len(inner)
    moved_names = {o for n in inner for o in n.output}
    moved_info = [v for v in g.value_info if v.name in moved_names]
    present_elem = {o.name: o.type.tensor_type.elem_type for o in g.output}
    # each branch output made inside the branch (a written value computed outside is passed through)
    made = [f"wf.memory_written.{i}" for i in range(len(written))]
    inner += [helper.make_node("Identity", [w], [m]) for w, m in zip(written, made)]
    then_out = [helper.make_tensor_value_info(m, present_elem[p], None) for m, p in zip(made, presents)]
    then_branch = helper.make_graph(inner, "segment_end_write", [], then_out, value_info=moved_info)
    kept = [f"wf.memory_kept.{i}" for i in range(len(passed))]
    else_branch = helper.make_graph([helper.make_node("Identity", [p], [k]) for p, k in zip(passed, kept)],
                                    "segment_open", [],
                                    [helper.make_tensor_value_info(k, present_elem[p], None)
                                     for k, p in zip(kept, presents)])
    branch = helper.make_node("If", [condition], presents, name="memory_written_when_the_segment_ends",
                              then_branch=then_branch, else_branch=else_branch)
    del g.node[:]
    g.node.extend(rest + [branch])
    keep_info = [v for v in g.value_info if v.name not in moved_names]
    del g.value_info[:]
    g.value_info.extend(keep_info)
    return n_moved


__all__ = ["write_on_segment_end"]
