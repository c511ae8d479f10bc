"""The plain inputs and outputs of an exported segment model, written into the ONNX graph.

torch.export cannot give what a plain onnxruntime user expects: one `input_ids` [batch, tokens]
with both sizes free (splitting it into whole segments and a last one inside the traced code
makes the shape solver guard on T // segment_len), and inputs that may be left out. So the
exported SegmentGraph takes `segments` and `tail`, and a few nodes written here (onnx.helper:
no library builds such a prologue) compute them from `input_ids`:

  S = (T - 1) // segment_len, segments = input_ids[:, :S * seg] as [B, S, seg], tail = the rest

and give the state inputs defaults: `past_memory.<p>` [L, 1, ...] zeros and `past_segments_seen` 0 as
initializers of the same name (ONNX's optional inputs), the memory expanded to the batch of
input_ids. Outputs: `logits`, `present_memory.<p>` [L, batch, ...], `present_segments_seen`.
Names follow transformers' ONNX exports (input_ids, logits; past_* in, present_* out). T >= 1.
Memory given without past_segments_seen reads as a fresh start (the first segment's flag is set
from the count alone): streaming hands every present_* back. A memory of batch 1 is broadcast to
every row (that is how the default works; ONNX cannot tell a default from a given input).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PAST_SEEN, PRESENT_SEEN = "past_segments_seen", "present_segments_seen"


def past_name(p: int) -> str:
    return f"past_memory.{p}"


def present_name(p: int) -> str:
    return f"present_memory.{p}"


def give_plain_io(proto: onnx.ModelProto, segment_len: int, n_layers: int, state_shapes) -> None:
    """Rewrite `proto` (exported from SegmentGraph: inputs segments, tail, segments_seen, the
    stacked state; outputs logits, segments_seen, the stacked state) in place to the plain form."""
    g = proto.graph
    old_in = [i.name for i in g.input]
    old_out = [o.name for o in g.output]
    n_state = len(state_shapes)
    if len(old_in) != 3 + n_state or len(old_out) != 2 + n_state:
        raise ValueError(f"unexpected exported graph: inputs {old_in}, outputs {old_out}")
    seg_in, tail_in, seen_in, *state_in = old_in
    elem = {i.name: i.type.tensor_type.elem_type for i in g.input}
    state_elem = elem[state_in[0]] if state_in else TensorProto.FLOAT
    consts = {"seg": [segment_len], "one": [1], "zero": [0], "big": [np.iinfo(np.int64).max], "L": [n_layers]}
    nodes = [helper.make_node("Constant", [], [f"wf.{k}"], value=numpy_helper.from_array(np.array(v, np.int64)))
             for k, v in consts.items()]
    nodes += [
        helper.make_node("Shape", ["input_ids"], ["wf.shape"]),
        helper.make_node("Slice", ["wf.shape", "wf.zero", "wf.one"], ["wf.B"]),
        helper.make_node("Slice", ["wf.shape", "wf.one", "wf.big"], ["wf.T"]),
        helper.make_node("Sub", ["wf.T", "wf.one"], ["wf.T1"]),
        helper.make_node("Div", ["wf.T1", "wf.seg"], ["wf.S"]),  # T >= 1: floor division of non-negatives
        helper.make_node("Mul", ["wf.S", "wf.seg"], ["wf.whole"]),
        helper.make_node("Slice", ["input_ids", "wf.zero", "wf.whole", "wf.one"], ["wf.whole_ids"]),
        helper.make_node("Concat", ["wf.B", "wf.S", "wf.seg"], ["wf.seg_shape"], axis=0),
        helper.make_node("Reshape", ["wf.whole_ids", "wf.seg_shape"], [seg_in]),
        helper.make_node("Slice", ["input_ids", "wf.whole", "wf.big", "wf.one"], [tail_in]),
        helper.make_node("Identity", [PAST_SEEN], [seen_in]),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])]
    defaults = [numpy_helper.from_array(np.array(0, np.int64), PAST_SEEN)]
    for p, (name, shape) in enumerate(zip(state_in, state_shapes)):
        rest = [int(s) for s in shape]
        nodes += [
            helper.make_node("Constant", [], [f"wf.rest{p}"], value=numpy_helper.from_array(np.array(rest, np.int64))),
            helper.make_node("Concat", ["wf.L", "wf.B", f"wf.rest{p}"], [f"wf.mem_shape{p}"], axis=0),
            helper.make_node("Expand", [past_name(p), f"wf.mem_shape{p}"], [name]),  # batch 1 -> B; B stays B
        ]
        inputs.append(helper.make_tensor_value_info(past_name(p), state_elem, [n_layers, "memory_batch", *rest]))
        defaults.append(numpy_helper.from_array(np.zeros([n_layers, 1, *rest], helper.tensor_dtype_to_np_dtype(state_elem)), past_name(p)))
    inputs.append(helper.make_tensor_value_info(PAST_SEEN, TensorProto.INT64, []))
    logits_out, seen_out, *state_out = old_out
    renames = [(logits_out, "logits"), (seen_out, PRESENT_SEEN)] + [
        (o, present_name(p)) for p, o in enumerate(state_out)]
    tail_nodes = [helper.make_node("Identity", [a], [b]) for a, b in renames]
    shapes = {o.name: o for o in g.output}
    outputs = []
    names = {0: ["batch", "tokens"]} | {2 + p: [None, "batch"] for p in range(n_state)}  # the inputs' dim names
    for k, (a, b) in enumerate(renames):
        info = onnx.ValueInfoProto()
        info.CopyFrom(shapes[a])
        info.name = b
        for dim, name in zip(info.type.tensor_type.shape.dim, names.get(k, [])):
            if name is not None:
                dim.dim_param = name
        outputs.append(info)
    replace_io(proto, nodes, tail_nodes, inputs, outputs, defaults)


def replace_io(proto: onnx.ModelProto, before: list, after: list, inputs: list, outputs: list, defaults: list) -> None:
    """Give `proto` new inputs and outputs: `before` nodes run ahead of the graph's own (from the
    new inputs to the old ones), `after` nodes behind them (to the new outputs); `defaults` are
    initializers named like inputs (ONNX's optional inputs)."""
    g = proto.graph
    new_nodes = before + list(g.node) + after
    del g.node[:]
    g.node.extend(new_nodes)
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(outputs)
    g.initializer.extend(defaults)
    if proto.ir_version < 4:  # initializers that are not inputs, and inputs with defaults, need IR >= 4
        proto.ir_version = 4


__all__ = ["PAST_SEEN", "PRESENT_SEEN", "give_plain_io", "past_name", "present_name", "replace_io"]
