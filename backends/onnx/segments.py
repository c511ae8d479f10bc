"""A segment model under the diagonal schedule as an exportable program (backends/segment_program.py).

Exported with a dynamic segment count S, the L + S - 1 steps of the schedule are one ONNX Scan
whose body runs all L lanes in one call of the lane-folded batched cell; lanes outside 0 <= t -
l < S (warm-up and drain) compute on padding and their state update is discarded, so the result
is the schedule's, exactly. Any model the one program serves exports (ARMT, the public ARMT
code, a cell of the user's own on the segment contract): the program is read off the captured
graph, not written for one family. Memory in and out are graph inputs and outputs (each state
position stacked over the layers), so a long input streams through a session in pieces.

Graph: segments [batch, S, segment_len] int64, one [L, batch, ...] tensor per state position,
fresh (bool: no segment seen yet, so each layer's first segment is in this call) -> logits
[batch, S * segment_len, ...] and the state tensors. The metadata records the state layout
(which memory leaf each layer's position is) and structure, so OnnxSegmentSession gives back
the model's own MemoryState. Whole segments only: a shorter last segment is the caller's to
run (see OnnxSegmentSession), never padded into a wrong memory.
"""
from __future__ import annotations

import json

import torch
from torch.utils._pytree import tree_unflatten, treespec_dumps, treespec_loads
from wavefront.backends.onnx.graphs import (
    ExportError,
    check_in_onnxruntime,
    save_with_metadata,
    to_onnx,
)
from wavefront.backends.onnx.session import Session, check_token_ids, input_embedding
from wavefront.backends.segment_program import ProgramNotApplicable, SegmentProgram
from wavefront.passes.segment_plan import stack_state, unstack_state
from wavefront.scheduler.schedule import diagonal

from wavefront.contract.segment import (
    MemoryState,
    SegmentLMOutput,
    as_memory_tensors,
    check_input_ids,
    check_memory,
)


def _layout_from_meta(meta: dict, n_layers: int):
    """(state_index [layer][position], per-position shapes without layer and batch, the state's
    pytree spec or None) from a graph's metadata; graphs exported before the layout was
    recorded carry ARMT's (A_0, z_0, A_1, z_1, ...)."""
    if "wavefront.state_layout" in meta:
        spec = treespec_loads(meta["wavefront.state_spec"]) if meta.get("wavefront.state_spec") else None
        return (json.loads(meta["wavefront.state_layout"]), [tuple(s) for s in json.loads(meta["wavefront.state_shapes"])],
                spec)
    if "wavefront.memory_shapes" in meta:  # A's and z's per layer, without batch
        shapes = [tuple(s) for s in json.loads(meta["wavefront.memory_shapes"])]
    else:  # the oldest graphs: A [d_key, d], z [d_key]
        d_key, d_model = (int(x) for x in meta["wavefront.memory_shape"].split(","))
        shapes = [(d_key, d_model), (d_key,)]
    return [[2 * l, 2 * l + 1] for l in range(n_layers)], shapes, None


class OnnxSegmentSession:
    """Runs an exported diagonal program in onnxruntime with the model's call: `session(input_ids,
    memory=None) -> SegmentLMOutput`. Whole segments go through the graph; a shorter last segment
    is refused with the length to pass instead (padding it would change the memory it writes)."""

    def __init__(self, path: str, providers=("CPUExecutionProvider",), strict: bool = True):
        import onnx

        meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        self.segment_len, self.n_layers = int(meta["wavefront.segment_len"]), int(meta["wavefront.n_layers"])
        self.session = Session(path, providers, strict=strict)
        self.providers = self.session.providers
        self.batch = self.session.session.get_inputs()[0].shape[0]  # fixed at export (an int), or symbolic (a str)
        self.layout, self.state_shapes, self.state_spec = _layout_from_meta(meta, self.n_layers)
        self.dtype = getattr(torch, meta["wavefront.dtype"].split(".")[-1])
        vocab = meta.get("wavefront.vocab_size")  # absent in graphs exported before it was recorded
        self.vocab_size = int(vocab) if vocab else None

    def __call__(self, input_ids: torch.Tensor, memory=None):
        check_input_ids(input_ids)  # the torch backend's checks: an ONNX Gather would wrap a negative id
        check_token_ids(input_ids, self.vocab_size)
        B, T = input_ids.shape
        if isinstance(self.batch, int) and B != self.batch:
            raise ValueError(f"this graph was exported for batch {self.batch}, got batch {B}: export again with an "
                             f"example of batch {B} (optimize(..., backend='onnxruntime') does that per batch)")
        if T % self.segment_len:
            raise ValueError(f"the exported graph runs whole segments of {self.segment_len} tokens; got {T} tokens: "
                             f"pass {T - T % self.segment_len} now and the rest with the next piece")
        stacked = [torch.zeros(self.n_layers, B, *shape, dtype=self.dtype) for shape in self.state_shapes]
        seen = 0
        if memory is not None:
            check_memory(memory, unstack_state(stacked, self.layout))  # the torch backend's messages, not onnxruntime's
            stacked = stack_state(memory.leaves(), self.layout)
            seen = memory.segments_seen
        ids = input_ids.long().reshape(B, -1, self.segment_len)  # the graph takes int64 ids
        logits, *stacked = self.session.run(ids, *stacked, torch.tensor(seen == 0))
        return SegmentLMOutput(logits, MemoryState(self.state(unstack_state(stacked, self.layout)),
                                                   seen + T // self.segment_len))

    def describe(self) -> str:
        return self.session.describe()

    def state(self, leaves) -> tuple:
        """The model's memory structure from its leaves (flat for graphs that did not record it)."""
        return tuple(leaves) if self.state_spec is None else as_memory_tensors(tree_unflatten(list(leaves), self.state_spec))


__all__ = ["OnnxSegmentSession", "export_segments"]


def export_segments(optimized, example_inputs: tuple, path: str, *, dynamic: bool = True, check: bool = True):
    """export_onnx for a model optimize() put under the diagonal schedule (see the module docstring)."""

    input_ids, memory = (tuple(example_inputs) + (None,))[:2]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ExportError("a segment model exports from example input_ids [batch, tokens] (and optionally a memory)")
    seg, L = optimized.rg.segment_len, optimized.rg.n_layers
    B, T = input_ids.shape
    if T == 0 or T % seg:
        raise ExportError(f"the example must hold whole segments of {seg} tokens (got {T}): the graph runs whole "
                          "segments, any number of them")
    executor = optimized.executor
    if executor.program is None:  # chosen at optimize(): the plan applies and the program checked itself
        why = ("only the diagonal schedule runs as one program (this model was optimized with schedule='sequential')"
               if optimized.batched is None else executor.program_reason)
        raise ExportError(f"this model does not export: {why}")
    with torch.no_grad():
        expected = _expected(optimized, input_ids, memory)
    try:
        program = SegmentProgram(executor.program.plan, optimized.batched.groups[0], own_copies=True).eval()
    except ProgramNotApplicable as e:
        raise ExportError(f"this model does not export: {e}") from e
    plan = program.plan
    dtype, _ = executor._dtype_device()
    if memory is None:
        memory = MemoryState(optimized.rg.initial_state(B, dtype, input_ids.device), 0)
    stacked = plan.stack_state(memory.leaves())
    traced = input_ids if T >= 2 * seg else input_ids.repeat(1, 2)  # one segment would fix S at 1 (0/1 specialisation)
    args = (traced.reshape(B, traced.shape[1] // seg, seg), *stacked, torch.tensor(memory.segments_seen == 0))
    shapes = ({1: torch.export.Dim.DYNAMIC}, (None,) * (len(stacked) + 1)) if dynamic else None
    onnx_program = to_onnx(program, args, shapes)
    proto = onnx_program.model_proto
    meta = {"wavefront.kind": "segments", "wavefront.family": optimized.rg.family,
            "wavefront.schedule": diagonal(L, T // seg).to_json(), "wavefront.schedule_rule":
            "diagonal: L + S - 1 steps, step t runs (l, t - l); S is the graph's segment count",
            "wavefront.segment_len": str(seg), "wavefront.n_layers": str(L),
            "wavefront.state_layout": json.dumps([list(r) for r in plan.state_index]),
            "wavefront.state_shapes": json.dumps([list(t.shape[2:]) for t in stacked]),
            "wavefront.state_spec": treespec_dumps(optimized.rg.state_spec), "wavefront.dtype": str(dtype),
            "wavefront.dynamic": json.dumps(bool(dynamic))}
    embedding = input_embedding(optimized.model)
    if embedding is not None:  # lets a session refuse ids outside the vocabulary, as torch does
        meta["wavefront.vocab_size"] = str(embedding.num_embeddings)
    save_with_metadata(proto, path, meta)
    if check:
        out = OnnxSegmentSession(path)(input_ids, memory)
        check_in_onnxruntime(path, example_inputs, expected, got=[out.logits, *out.memory.leaves()][:len(expected)])
    return proto


def _expected(optimized, input_ids, memory) -> list:
    """What the exported graph must give on the example: the user's own forward (logits, and the
    memory where the model returns it); for a model whose forward starts fresh only, continuing a
    stream, the optimized model's (itself verified against that forward)."""
    bound = optimized.bound
    if memory is not None and not bound.reference_takes_memory:
        out = optimized(input_ids, memory)
        return [out.logits, *out.memory.leaves()]
    ref = bound.reference(input_ids, memory)
    logits = ref.logits if hasattr(ref, "logits") else ref
    return [logits, *(ref.memory.leaves() if isinstance(getattr(ref, "memory", None), MemoryState) else ())]
