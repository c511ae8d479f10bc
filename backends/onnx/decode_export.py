"""export_onnx(..., decode=True): a segment model's decode step as an ONNX graph (decode_graph.py),
checked in onnxruntime against the model's own forward.

The memory inputs and outputs have the segment graph's layout (present_memory.<p> of one is
past_memory.<p> of the other), so a deployment prefills the finished segments with the segment
graph and decodes with this one (examples/onnx_generate.py).
"""
from __future__ import annotations

import json

import numpy as np
import torch
from torch.export import Dim
from torch.utils._pytree import tree_leaves
from wavefront.backends.onnx.decode_graph import (
    DecodeGraph,
    cache_names,
    give_decode_io,
)
from wavefront.backends.onnx.graph_io import PAST_SEEN, past_name, present_name
from wavefront.backends.onnx.graphs import (
    ExportError,
    check_in_onnxruntime,
    example_ids,
    save_model_graph,
    to_onnx,
)
from wavefront.backends.onnx.session import open_session

SEQ_DIM = -2  # the window's sequence dim of every cached key/value (kv_window.KVWindow)


def export_decode(optimized, example_inputs: tuple, path: str, *, check: bool = True):
    """The decode step of `optimized` (an OptimizedModel) written to `path`; returns the onnx.ModelProto.
    The example's token ids seed the check (any batch and length work in the graph)."""
    decoder = optimized.cached_decoder()
    if decoder is None:
        raise ExportError(f"this model's decode step does not export: {optimized.decode_reason}")
    executor, rg = optimized.executor, optimized.rg
    if executor.program is None:
        raise ExportError(f"this model's decode step does not export: its memory has no program layout "
                          f"({executor.program_reason})")
    seg, L, plan = rg.segment_len, rg.n_layers, executor.program.plan
    if seg < 4:  # traced at 2 cached tokens and 2 new: sizes of 0 or 1 would be fixed by the trace
        raise ExportError(f"the decode step exports for segments of 4 tokens or more (this model's: {seg})")
    dtype, device = executor._dtype_device()
    ids = example_ids(example_inputs[0], 2, 4, device)
    with torch.no_grad():
        stream = decoder.stream(None, 2, dtype, device)
        stream.feed(ids[:, :2])
    past = [t.clone() for pair in stream._cache for t in pair]  # not views: torch.export guards on a view's base
    stacked = plan.stack_state(tree_leaves(rg.initial_state(2, dtype, device)))
    graph = DecodeGraph(rg.cell, plan, rg.state_from_leaves, len(stacked), len(stream._cache), SEQ_DIM).eval()
    batch, tokens, cached = Dim.DYNAMIC, Dim("tokens", min=1, max=seg), Dim("past_tokens", min=0, max=seg - 1)
    shapes = ({0: batch, 1: tokens}, None, tuple({1: batch} for _ in stacked),
              tuple({0: batch, t.dim() + SEQ_DIM: cached} for t in past))
    args = (ids[:, 2:].clone(), torch.tensor(0), *stacked, *past)
    proto = to_onnx(graph, args, (shapes[0], shapes[1], (*shapes[2], *shapes[3])))
    state_shapes = [list(t.shape[2:]) for t in stacked]
    give_decode_io(proto, seg, L, state_shapes, [list(t.shape) for t in past], SEQ_DIM)
    meta = {"wavefront.kind": "decode step", "wavefront.family": rg.family, "wavefront.segment_len": str(seg),
            "wavefront.n_layers": str(L), "wavefront.dtype": str(dtype),
            "wavefront.state_layout": json.dumps([list(r) for r in plan.state_index]),
            "wavefront.state_shapes": json.dumps(state_shapes),
            "wavefront.memory_inputs": json.dumps([past_name(p) for p in range(len(stacked))]),
            "wavefront.cache_inputs": json.dumps([n for i in range(len(stream._cache)) for n in cache_names(i)[:2]]),
            "wavefront.rule": "input_ids: 1 to segment_len - past_tokens tokens; when they fill the segment, "
                              "present_memory is the memory it wrote and the present cache is empty"}
    precision = save_model_graph(proto, path, meta, optimized.model, dtype)
    if check:
        _check(optimized, path, example_inputs[0], precision)
    return proto


def decode_stream(session, ids: np.ndarray, pieces, past: dict | None = None):
    """Feed `ids` [batch, tokens] to a decode-step session in `pieces` (token counts), handing the
    present_* outputs back; returns (the logits of every token, the last call's outputs by name)."""
    outputs = [o.name for o in session.get_outputs()]
    past, logits, at = dict(past or {}), [], 0
    for n in pieces:
        out = dict(zip(outputs, session.run(None, {"input_ids": ids[:, at:at + n], **past})))
        logits.append(out["logits"])
        past = {k.replace("present_", "past_"): v for k, v in out.items() if k.startswith("present_")}
        at += n
    return np.concatenate(logits, axis=1), out


def _check(optimized, path, example, precision) -> None:
    """The graph against the model's own forward on a batch it was not traced at: a first segment
    fed as 2 tokens then the rest (its memory written, the cache emptied), then 1 and 1 more."""
    seg = optimized.rg.segment_len
    ids = example_ids(example, 3, seg + 2, example.device)
    session = open_session(path, ("CPUExecutionProvider",), strict=True)
    got, last = decode_stream(session, ids.cpu().numpy(), [2, seg - 2, 1, 1])
    with torch.no_grad():
        whole = optimized.bound.reference(ids, None)
        at_end = optimized.bound.reference(ids[:, :seg], None).memory
    want_memory = optimized.executor.program.plan.stack_state(at_end.leaves())
    if int(last["present_segments_seen"]) != 1 or last[cache_names(0)[2]].shape[SEQ_DIM] != 2:
        raise ExportError("the exported decode step lost count of its segment (segments seen "
                          f"{int(last['present_segments_seen'])}, cached tokens {last[cache_names(0)[2]].shape[SEQ_DIM]};"
                          " expected 1 and 2)")
    outputs = [torch.from_numpy(got), *(torch.from_numpy(last[present_name(p)]) for p in range(len(want_memory)))]
    check_in_onnxruntime(path, (), [whole.logits, *want_memory], got=outputs, precision=precision)


__all__ = ["PAST_SEEN", "decode_stream", "export_decode"]
