"""The decode step of a segment model as an ONNX graph: the next tokens of the current segment,
with its key/value cache and the memory before it in, and the logits, the grown cache and the
memory out (wavefront/kv_decode.py's cached decoding, exported).

`DecodeGraph` is the torch side: the model's own cell in a key/value window
(wavefront/contract/kv_window.py) on n new tokens, from the memory in the program's layout
([L, batch, ...] per state position, as the segment graph's present_memory.<p>). `give_decode_io`
writes the plain interface around it with a few ONNX nodes (onnx.helper; the segment end is a
data-free shape test torch.export would fix at trace time):

  inputs  input_ids [batch, tokens] (1 <= tokens <= segment_len - past_tokens),
          past_memory.<p>, past_segments_seen, past_key.<i>, past_value.<i> [batch, ..., past_tokens, ...]
          (all optional: fresh memory, an empty cache)
  outputs logits, present_memory.<p>, present_segments_seen, present_key.<i>, present_value.<i>

More tokens than the segment has left (past_tokens + tokens > segment_len) make the run fail,
the error naming node TOO_MANY_TOKENS. When the tokens fill the segment (past_tokens + tokens == segment_len), present_memory is the
memory the segment wrote, present_segments_seen counts it and the present cache is empty: the
next call starts the next segment. Otherwise the memory passes through and the cache grows; the
nodes that only write the memory then do not run (an If on the segment's end, write_branch.py).
So a stream is: feed tokens, hand every present_* back as past_*.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.utils._pytree import tree_leaves
from wavefront.backends.onnx.graph_io import (
    PAST_SEEN,
    PRESENT_SEEN,
    past_name,
    present_name,
    replace_io,
)
from wavefront.backends.onnx.write_branch import write_on_segment_end

from wavefront.contract.kv_window import KVWindow

TOO_MANY_TOKENS = "input_ids_hold_more_tokens_than_the_segment_has_left:feed_at_most_segment_len_minus_past_tokens"


def cache_names(i: int) -> tuple[str, str, str, str]:
    """past_key.<i>, past_value.<i>, present_key.<i>, present_value.<i> (i: the cell's i-th attention call)."""
    return f"past_key.{i}", f"past_value.{i}", f"present_key.{i}", f"present_value.{i}"


class DecodeGraph(nn.Module):
    """forward(input_ids [B, n], segments_seen [], *stacked_state, *past (key, value per attention
    call)) -> (logits [B, n, ...], *written stacked state, *present (key, value per call))."""

    def __init__(self, cell: nn.Module, plan, state_from_leaves, n_state: int, n_calls: int, seq_dim: int):
        super().__init__()
        self.cell, self.plan, self.n_state, self.n_calls, self.seq_dim = cell, plan, n_state, n_calls, seq_dim
        object.__setattr__(self, "state_from_leaves", state_from_leaves)

    def forward(self, new_ids, seen, *flat):  # (names unlike the plain inputs give_decode_io adds)
        stacked, kv = list(flat[:self.n_state]), flat[self.n_state:]
        past = [(kv[2 * i], kv[2 * i + 1]) for i in range(self.n_calls)]
        state = self.state_from_leaves(self.plan.unstack_state(stacked))
        with KVWindow(past, past[0][0].shape[self.seq_dim], new_ids.shape[1], self.seq_dim) as window:
            logits, written = self.cell(new_ids, seen == 0, state)
        return (logits, *self.plan.stack_state(tree_leaves(written)), *[t for pair in window.present for t in pair])


def give_decode_io(proto: onnx.ModelProto, segment_len: int, n_layers: int, state_shapes, cache_shapes,
                   seq_dim: int) -> None:
    """Rewrite `proto` (exported from DecodeGraph) in place to the plain interface (module docstring).
    cache_shapes: each cached tensor's shape (key, value per attention call); seq_dim: their
    sequence dim. Only the batch and sequence sizes of those shapes are free."""
    g = proto.graph
    old_in, old_out = [i.name for i in g.input], [o.name for o in g.output]
    n_state, n_cache = len(state_shapes), len(cache_shapes)
    if len(old_in) != 2 + n_state + n_cache or len(old_out) != 1 + n_state + n_cache:
        raise ValueError(f"unexpected exported decode graph: inputs {old_in}, outputs {old_out}")
    ids_in, seen_in, state_in, cache_in = old_in[0], old_in[1], old_in[2:2 + n_state], old_in[2 + n_state:]
    logits_out, state_out, cache_out = old_out[0], old_out[1:1 + n_state], old_out[1 + n_state:]
    elem = {i.name: i.type.tensor_type.elem_type for i in g.input}

    def const(name, values):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64)))

    seq0 = seq_dim % len(cache_shapes[0])
    pre = [const("wf.seg", [segment_len]), const("wf.one", [1]), const("wf.zero", [0]), const("wf.two", [2]),
           helper.make_node("Shape", ["input_ids"], ["wf.ids_shape"]),
           helper.make_node("Slice", ["wf.ids_shape", "wf.zero", "wf.one"], ["wf.B"]),
           helper.make_node("Slice", ["wf.ids_shape", "wf.one", "wf.two"], ["wf.n"]),
           helper.make_node("Shape", [cache_names(0)[0]], ["wf.past_tokens"], start=seq0, end=seq0 + 1),
           helper.make_node("Add", ["wf.past_tokens", "wf.n"], ["wf.filled"]),
           helper.make_node("Equal", ["wf.filled", "wf.seg"], ["wf.full"]),  # [1]: this call ends the segment
           # more tokens than the segment has left: refused. ONNX has no assert; a Reshape to -2 fails
           # at run time, and onnxruntime's error names the node, so its name says what was wrong
           const("wf.bad_shape", [-2]),
           helper.make_node("Greater", ["wf.filled", "wf.seg"], ["wf.over"]),
           helper.make_node("Where", ["wf.over", "wf.bad_shape", "wf.one"], ["wf.guard_shape"]),
           helper.make_node("Reshape", ["wf.one", "wf.guard_shape"], ["wf.guard"], name=TOO_MANY_TOKENS),
           helper.make_node("Sub", ["wf.guard", "wf.one"], ["wf.guard_zero"]),  # 0; every cache output needs it
           helper.make_node("Where", ["wf.full", "wf.zero", "wf.filled"], ["wf.kept_raw"]),
           helper.make_node("Add", ["wf.kept_raw", "wf.guard_zero"], ["wf.kept"]),  # cache rows handed on
           helper.make_node("Cast", ["wf.full"], ["wf.full_i"], to=TensorProto.INT64),
           helper.make_node("Squeeze", ["wf.full_i", "wf.zero"], ["wf.ended"]),
           helper.make_node("Identity", ["input_ids"], [ids_in]),
           helper.make_node("Identity", [PAST_SEEN], [seen_in])]
    post = [helper.make_node("Identity", [logits_out], ["logits"]),
            helper.make_node("Add", [PAST_SEEN, "wf.ended"], [PRESENT_SEEN])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"])]
    state_io, cache_io = [], []
    defaults = [numpy_helper.from_array(np.array(0, np.int64), PAST_SEEN)]

    def expand_batch(past: str, rank: int, batch_dim: int, into: str) -> list:
        """A default's batch 1 broadcast to B (a given batch B stays B)."""
        return [const(f"wf.{past}.before", [1] * batch_dim), const(f"wf.{past}.after", [1] * (rank - batch_dim - 1)),
                helper.make_node("Concat", [f"wf.{past}.before", "wf.B", f"wf.{past}.after"], [f"wf.{past}.to"],
                                 axis=0),
                helper.make_node("Expand", [past, f"wf.{past}.to"], [into])]

    state_elem = elem[state_in[0]] if state_in else TensorProto.FLOAT
    for p, (name, shape) in enumerate(zip(state_in, state_shapes)):
        rest, past, present = [int(s) for s in shape], past_name(p), present_name(p)
        pre += expand_batch(past, 2 + len(rest), 1, name)
        post.append(helper.make_node("Where", ["wf.full", state_out[p], name], [present]))
        inputs.append(helper.make_tensor_value_info(past, state_elem, [n_layers, "batch", *rest]))
        state_io.append(helper.make_tensor_value_info(present, state_elem, [n_layers, "batch", *rest]))
        defaults.append(numpy_helper.from_array(
            np.zeros([n_layers, 1, *rest], helper.tensor_dtype_to_np_dtype(state_elem)), past))
    inputs.append(helper.make_tensor_value_info(PAST_SEEN, TensorProto.INT64, []))
    for c, (name, shape) in enumerate(zip(cache_in, cache_shapes)):
        i, is_value = divmod(c, 2)
        names = cache_names(i)
        past, present = (names[1], names[3]) if is_value else (names[0], names[2])
        seq = seq_dim % len(shape)
        dims = ["batch" if d == 0 else ("past_tokens" if d == seq else int(s)) for d, s in enumerate(shape)]
        pre += expand_batch(past, len(shape), 0, name)
        post += [const(f"wf.{past}.axis", [seq]),
                 helper.make_node("Slice", [cache_out[c], "wf.zero", "wf.kept", f"wf.{past}.axis"], [present])]
        inputs.append(helper.make_tensor_value_info(past, elem[name], dims))
        cache_io.append(helper.make_tensor_value_info(
            present, elem[name], ["present_tokens" if d == "past_tokens" else d for d in dims]))
        empty = [1 if d == 0 else (0 if d == seq else int(s)) for d, s in enumerate(shape)]
        defaults.append(numpy_helper.from_array(np.zeros(empty, helper.tensor_dtype_to_np_dtype(elem[name])), past))
    logits_info = onnx.ValueInfoProto()
    logits_info.CopyFrom(next(o for o in g.output if o.name == logits_out))
    logits_info.name = "logits"
    for dim, label in zip(logits_info.type.tensor_type.shape.dim, ["batch", "tokens"]):
        dim.dim_param = label
    replace_io(proto, pre, post, inputs,
               [logits_info, *state_io, helper.make_tensor_value_info(PRESENT_SEEN, TensorProto.INT64, []), *cache_io],
               defaults)
    write_on_segment_end(proto, "wf.full", [present_name(p) for p in range(n_state)])  # the write: only when it ends


__all__ = ["TOO_MANY_TOKENS", "DecodeGraph", "cache_names", "give_decode_io"]
