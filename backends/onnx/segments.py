"""A segment model under the diagonal schedule as one ONNX graph anyone can run.

`onnxruntime.InferenceSession(path).run(None, {"input_ids": ids})` works: input_ids [batch,
tokens], both free (any batch, any length >= 1, a short last segment exact); the memory inputs
`past_memory.<p>` (each state position stacked over the layers: [L, batch, ...]) and
`past_segments_seen` may be left out (fresh memory); the outputs `logits`, `present_memory.<p>`
and `present_segments_seen` stream a long input in pieces. Inside: the whole segments as the
diagonal program (backends/segment_program.py: the L + S - 1 steps in one ONNX Scan, lanes
outside 0 <= t - l < S masked), the last segment through the model's own cell
(segment_graph.py), the plain inputs around them (graph_io.py). Any model the one program serves
exports (ARMT, the public ARMT code, a cell of the user's own on the segment contract).

The metadata records the state layout (which memory leaf each layer's position is) and
structure, so OnnxSegmentSession gives back the model's own MemoryState.
"""
from __future__ import annotations

import json

import torch
from torch.export import Dim
from torch.utils._pytree import (
    tree_leaves,
    tree_unflatten,
    treespec_dumps,
    treespec_loads,
)
from wavefront.backends.onnx.graph_io import PAST_SEEN, give_plain_io, past_name
from wavefront.backends.onnx.graphs import (
    ExportError,
    check_in_onnxruntime,
    example_ids,
    save_model_graph,
    to_onnx,
)
from wavefront.backends.onnx.segment_graph import SegmentGraph
from wavefront.backends.onnx.session import Session, check_token_ids
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
    pytree spec) from a graph's metadata."""
    spec = treespec_loads(meta["wavefront.state_spec"]) if meta.get("wavefront.state_spec") else None
    return (json.loads(meta["wavefront.state_layout"]), [tuple(s) for s in json.loads(meta["wavefront.state_shapes"])],
            spec)


class OnnxSegmentSession:
    """Runs an exported segment graph in onnxruntime with the model's call: `session(input_ids,
    memory=None) -> SegmentLMOutput`, any batch and length."""

    def __init__(self, path: str, providers=("CPUExecutionProvider",), strict: bool = True):
        import onnx

        meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        self.segment_len, self.n_layers = int(meta["wavefront.segment_len"]), int(meta["wavefront.n_layers"])
        self.session = Session(path, providers, strict=strict)
        if self.session.inputs[0] != "input_ids":
            raise ValueError(f"{path} was exported by an older wavefront (inputs {self.session.inputs}): export it "
                             "again (wavefront.export_onnx)")
        self.providers = self.session.providers
        self.layout, self.state_shapes, self.state_spec = _layout_from_meta(meta, self.n_layers)
        self.dtype = getattr(torch, meta["wavefront.dtype"].split(".")[-1])
        vocab = meta.get("wavefront.vocab_size")
        self.vocab_size = int(vocab) if vocab else None

    def __call__(self, input_ids: torch.Tensor, memory=None):
        check_input_ids(input_ids)  # the torch backend's checks: an ONNX Gather would wrap a negative id
        check_token_ids(input_ids, self.vocab_size)
        B, T = input_ids.shape
        stacked = [torch.zeros(self.n_layers, 1, *shape, dtype=self.dtype) for shape in self.state_shapes]
        seen = 0
        if memory is not None:
            fresh = unstack_state([s.expand(self.n_layers, B, *s.shape[2:]) for s in stacked], self.layout)
            check_memory(memory, fresh)  # the torch backend's messages, not onnxruntime's
            stacked = stack_state(memory.leaves(), self.layout)
            seen = memory.segments_seen
        names = ["input_ids", *(past_name(p) for p in range(len(stacked))), PAST_SEEN]
        logits, _, *stacked = self.session.run(input_ids.long(), *stacked, torch.tensor(seen), names=names)
        return SegmentLMOutput(logits, MemoryState(self.state(unstack_state(stacked, self.layout)),
                                                   seen + -(-T // self.segment_len)))

    def describe(self) -> str:
        return self.session.describe()

    def state(self, leaves) -> tuple:
        """The model's memory structure from its leaves (flat for graphs that did not record it)."""
        return tuple(leaves) if self.state_spec is None else as_memory_tensors(tree_unflatten(list(leaves), self.state_spec))


__all__ = ["OnnxSegmentSession", "export_segments"]


def export_segments(optimized, example_inputs: tuple, path: str, *, dynamic: bool = True, check: bool = True):
    """export_onnx for a model optimize() put under the diagonal schedule (see the module docstring).
    The graph is checked in onnxruntime against the model's own forward on the example, and on
    a second batch size with a short last segment (the sizes the trace did not see)."""

    input_ids, memory = (tuple(example_inputs) + (None,))[:2]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ExportError("a segment model exports from example input_ids [batch, tokens] (and optionally a memory)")
    if not dynamic:
        raise ExportError("a segment graph is always exported with its batch and length free (dynamic=False "
                          "has nothing to fix: every size the graph takes is checked in onnxruntime)")
    seg, L = optimized.rg.segment_len, optimized.rg.n_layers
    executor = optimized.executor
    if executor.program is None:  # chosen at optimize(): the plan applies and the program checked itself
        why = ("only the diagonal schedule runs as one program (this model was optimized with schedule='sequential')"
               if optimized.batched is None else executor.program_reason)
        raise ExportError(f"this model does not export: {why}")
    try:
        program = SegmentProgram(executor.program.plan, optimized.batched.groups[0], own_copies=True).eval()
    except ProgramNotApplicable as e:
        raise ExportError(f"this model does not export: {e}") from e
    plan, rg = program.plan, optimized.rg
    graph = SegmentGraph(program, rg.cell, rg.state_from_leaves, optimized.batched.groups[0].stack).eval()
    dtype, device = executor._dtype_device()
    # traced at batch 2, two whole segments and a last one of 2 tokens: sizes of 0 or 1 would be
    # fixed by the trace (torch.export's 0/1 specialisation); only shapes matter to it
    ids = example_ids(input_ids, 2, 2 * seg + 2, input_ids.device)
    stacked = plan.stack_state(tree_leaves(rg.initial_state(2, dtype, device)))
    args = (ids[:, :2 * seg].reshape(2, 2, seg), ids[:, 2 * seg:], torch.tensor(0), *stacked)
    batch, tail = Dim.DYNAMIC, Dim("tail", min=1, max=seg)
    shapes = ({0: batch, 1: Dim.DYNAMIC}, {0: batch, 1: tail}, None, tuple({1: batch} for _ in stacked))
    proto = to_onnx(graph, args, shapes)
    state_shapes = [list(t.shape[2:]) for t in stacked]
    give_plain_io(proto, seg, L, state_shapes)
    meta = {"wavefront.kind": "segments", "wavefront.family": rg.family,
            "wavefront.schedule": diagonal(L, max(1, (input_ids.shape[1] - 1) // seg)).to_json(),
            "wavefront.schedule_rule": "diagonal over the whole segments before the last: L + S - 1 steps, step t "
                                       "runs (l, t - l); the last segment (1 to segment_len tokens) by the model's cell",
            "wavefront.segment_len": str(seg), "wavefront.n_layers": str(L),
            "wavefront.state_layout": json.dumps([list(r) for r in plan.state_index]),
            "wavefront.state_shapes": json.dumps(state_shapes),
            "wavefront.state_spec": treespec_dumps(rg.state_spec), "wavefront.dtype": str(dtype),
            "wavefront.memory_inputs": json.dumps([past_name(p) for p in range(len(stacked))])}
    precision = save_model_graph(proto, path, meta, optimized.model, dtype)
    if check:
        session = OnnxSegmentSession(path)
        for probe, mem in _probes(input_ids, memory, seg):
            with torch.no_grad():
                expected = _expected(optimized, probe, mem)
            out = session(probe, mem)
            check_in_onnxruntime(path, (probe,), expected, got=[out.logits, *out.memory.leaves()][:len(expected)],
                                 precision=precision)
    return proto


def _probes(input_ids, memory, seg):
    """The example, then (fresh memory) one more row and a short last segment: sizes the trace
    did not see, so a graph that fixed one of them is caught here."""
    yield input_ids, memory
    B, T = input_ids.shape
    rows = input_ids[torch.arange(B + 1, device=input_ids.device) % B]
    short = max(1, T - 1)
    if short % seg == 0 and short > 1:
        short -= 1
    yield rows[:, :short], None


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
