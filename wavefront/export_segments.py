"""ARMT under the diagonal schedule as an exportable program: the batched cell in a scan over steps.

Step t of the diagonal schedule runs lane l on segment t - l. Exported with a dynamic segment
count S, every step runs all L lanes as one call of the lane-folded batched cell (the same
FoldLaneCell the torch backend runs); lanes outside 0 <= t - l < S (warm-up and drain) compute
on padding and their memory update is discarded (torch.where), so the result is the schedule's,
exactly. The L + S - 1 steps are one ONNX Scan whose carry holds the lanes' outputs from the
previous step (lane l reads lane l - 1's) and the per-layer memory stacked on a leading layer dim;
the top lane's output of step t is segment t - L + 1's. Memory in and out are graph inputs and
outputs, so a long input streams through a session in pieces.

Graph: segments [batch, S, segment_len] int64, A [L, batch, d_key, d], z [L, batch, d_key],
fresh (bool: no segment seen yet, so each layer's first segment is in this call) ->
logits [batch, S * segment_len, vocab], A, z. Whole segments only: a shorter last segment is
the caller's to run (see OnnxSegmentSession), never padded into a wrong memory.
"""
from __future__ import annotations

import json

import torch

from wavefront.backends.diagonal_program import DiagonalProgram, ProgramNotApplicable, stacked_memory, unstacked_memory


class OnnxSegmentSession:
    """Runs an exported diagonal program in onnxruntime with the model's call: `session(input_ids,
    memory=None) -> SegmentLMOutput`. Whole segments go through the graph; a shorter last segment
    is refused with the length to pass instead (padding it would change the memory it writes)."""

    def __init__(self, path: str, providers=("CPUExecutionProvider",)):
        import onnx

        from wavefront.backends.onnxruntime_backend import open_session
        meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        self.segment_len, self.n_layers = int(meta["wavefront.segment_len"]), int(meta["wavefront.n_layers"])
        self.session = open_session(path, providers)
        self.providers = self.session.get_providers()
        self.names = [i.name for i in self.session.get_inputs()]
        self.batch = self.session.get_inputs()[0].shape[0]  # fixed at export (an int), or symbolic (a str)
        if "wavefront.memory_shapes" in meta:  # per layer, without batch: A's and z's (multi-head states too)
            self.a_shape, self.z_shape = (tuple(s) for s in json.loads(meta["wavefront.memory_shapes"]))
        else:  # graphs exported before the shapes were recorded whole: A [d_key, d], z [d_key]
            d_key, d_model = (int(x) for x in meta["wavefront.memory_shape"].split(","))
            self.a_shape, self.z_shape = (d_key, d_model), (d_key,)
        self.dtype = getattr(torch, meta["wavefront.dtype"].split(".")[-1])
        vocab = meta.get("wavefront.vocab_size")  # absent in graphs exported before it was recorded
        self.vocab_size = int(vocab) if vocab else None

    def __call__(self, input_ids: torch.Tensor, memory=None):
        from wavefront.backends.onnxruntime_backend import check_token_ids
        from wavefront.models.segment import MemoryState, SegmentLMOutput, check_input_ids, check_memory
        check_input_ids(input_ids)  # the torch backend's checks: an ONNX Gather would wrap a negative id
        check_token_ids(input_ids, self.vocab_size)
        B, T = input_ids.shape
        if isinstance(self.batch, int) and B != self.batch:
            raise ValueError(f"this graph was exported for batch {self.batch}, got batch {B}: export again with an "
                             f"example of batch {B} (optimize(..., backend='onnxruntime') does that per batch)")
        if T % self.segment_len:
            raise ValueError(f"the exported graph runs whole segments of {self.segment_len} tokens; got {T} tokens: "
                             f"pass {T - T % self.segment_len} now and the rest with the next piece")
        A = torch.zeros(self.n_layers, B, *self.a_shape, dtype=self.dtype)
        z = torch.zeros(self.n_layers, B, *self.z_shape, dtype=self.dtype)
        seen = 0
        if memory is not None:
            check_memory(memory, unstacked_memory(A, z))  # the torch backend's messages, not onnxruntime's
            A, z = stacked_memory(memory.tensors, self.n_layers)
            seen = memory.segments_seen
        ids = input_ids.long().reshape(B, -1, self.segment_len)  # the graph takes int64 ids
        feed = dict(zip(self.names, [ids.numpy(), A.numpy(), z.numpy(), torch.tensor(seen == 0).numpy()]))
        logits, A2, z2 = (torch.from_numpy(x) for x in self.session.run(None, feed))
        return SegmentLMOutput(logits, MemoryState(unstacked_memory(A2, z2), seen + T // self.segment_len))


__all__ = ["OnnxSegmentSession", "export_segments"]


def export_segments(optimized, example_inputs: tuple, path: str, *, dynamic: bool = True, check: bool = True):
    """export_onnx for a model optimize() put under the diagonal schedule (see the module docstring)."""

    from wavefront.backends.onnxruntime_backend import input_embedding
    from wavefront.export import ExportError, _check_in_onnxruntime, _to_onnx, save_with_metadata
    from wavefront.models.segment import MemoryState
    from wavefront.scheduler.schedule import diagonal
    input_ids, memory = (tuple(example_inputs) + (None,))[:2]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ExportError("a segment model exports from example input_ids [batch, tokens] (and optionally a memory)")
    seg, L = optimized.rg.segment_len, optimized.rg.n_layers
    B, T = input_ids.shape
    if T == 0 or T % seg:
        raise ExportError(f"the example must hold whole segments of {seg} tokens (got {T}): the graph runs whole "
                          "segments, any number of them")
    with torch.no_grad():  # the folded cell checks itself on its first full-width step: eagerly, here
        optimized(torch.zeros(B, (L + 1) * seg, dtype=input_ids.dtype, device=input_ids.device))
        expected = _expected(optimized, input_ids, memory)
    try:
        program = DiagonalProgram(optimized, own_copies=True).eval()
    except ProgramNotApplicable as e:
        raise ExportError(f"this model does not export: {e}") from e
    dtype = next(program.buffers()).dtype
    if memory is None:
        state = optimized.rg.initial_state(B, dtype, input_ids.device)
        memory = MemoryState(state, 0)
    A, z = stacked_memory(memory.tensors, L)
    traced = input_ids if T >= 2 * seg else input_ids.repeat(1, 2)  # one segment would fix S at 1 (0/1 specialisation)
    args = (traced.reshape(B, traced.shape[1] // seg, seg), A, z, torch.tensor(memory.segments_seen == 0))
    shapes = ({1: torch.export.Dim.DYNAMIC}, None, None, None) if dynamic else None
    onnx_program = _to_onnx(program, args, shapes)
    proto = onnx_program.model_proto
    meta = {"wavefront.kind": "segments", "wavefront.family": optimized.rg.family,
            "wavefront.schedule": diagonal(L, T // seg).to_json(), "wavefront.schedule_rule":
            "diagonal: L + S - 1 steps, step t runs (l, t - l); S is the graph's segment count",
            "wavefront.segment_len": str(seg), "wavefront.n_layers": str(L),
            "wavefront.memory_shape": f"{A.shape[2]},{A.shape[3]}",
            "wavefront.memory_shapes": json.dumps([list(A.shape[2:]), list(z.shape[2:])]), "wavefront.dtype": str(dtype),
            "wavefront.dynamic": json.dumps(bool(dynamic))}
    embedding = input_embedding(optimized.model)
    if embedding is not None:  # lets a session refuse ids outside the vocabulary, as torch does
        meta["wavefront.vocab_size"] = str(embedding.num_embeddings)
    save_with_metadata(proto, path, meta)
    if check:
        out = OnnxSegmentSession(path)(input_ids, memory)
        _check_in_onnxruntime(path, example_inputs, expected, got=[out.logits, *out.memory.tensors][:len(expected)])
    return proto


def _expected(optimized, input_ids, memory) -> list:
    """What the exported graph must give on the example: the user's own forward (logits, and the
    memory where the model returns it); for a model whose forward starts fresh only, continuing a
    stream, the optimized model's (itself verified against that forward)."""
    from wavefront.models.segment import MemoryState
    bound = optimized.bound
    if memory is not None and not bound.reference_takes_memory:
        out = optimized(input_ids, memory)
        return [out.logits, *out.memory.tensors]
    ref = bound.reference(input_ids, memory)
    logits = ref.logits if hasattr(ref, "logits") else ref
    return [logits, *(ref.memory.tensors if isinstance(getattr(ref, "memory", None), MemoryState) else ())]
