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

import contextlib

import torch
from torch import nn


class DiagonalProgram(nn.Module):
    """The export form of an optimized ARMT (one layer kind, lane-folded cell). Built from what
    optimize() returned, after at least one call with L or more segments (the folded cell checks
    itself against vmap on its first multi-lane call; that must happen eagerly)."""

    def __init__(self, optimized):
        super().__init__()
        from wavefront.export import ExportError
        batched, rg = optimized.batched, optimized.rg
        if batched is None:
            raise ExportError("only the diagonal schedule exports (this model was optimized with schedule='sequential')")
        if len(batched.groups) != 1:
            raise ExportError(f"the layer stack has {len(batched.groups)} layer kinds (a hybrid stack): exporting "
                              "runs one batched cell per step, so all layers must be of one kind for now")
        group = batched.groups[0]
        if getattr(group.cell, "mode", "") != "fold" or not getattr(group.cell, "checked", False):
            why = getattr(group.cell, "fallback_reason", "") or f"its batched cell runs as {group.cell.mode!r}"
            raise ExportError(f"the batched cell does not export: {why} (vmap inside an ONNX Scan does not lower)")
        cell = optimized.reference.cell
        self.n_layers, self.segment_len, self.n_mem = len(cell.layers), optimized.rg.segment_len, cell.n_mem_tokens
        self.embed_stage, self.norm, self.lm_head, self.memory = cell.embed_stage, cell.norm, cell.lm_head, cell.memory
        object.__setattr__(self, "cell", group.cell)  # not a submodule: its layer templates alias the model's
        self.folded = group.cell.folded  # registered: the graph's own constants are traced as this module's
        self.stack_names = list(group.cell.param_names)
        with torch.no_grad():  # the stacks as buffers of their own (export lifts them into initializers)
            for i, t in enumerate(group.stack.slices(0, self.n_layers, self.stack_names).values()):
                self.register_buffer(f"stack{i}", t.detach().clone())
        self.family = rg.family

    def forward(self, segments, A, z, fresh):
        from torch._higher_order_ops.scan import scan
        B, S, seg = segments.shape
        L = self.n_layers
        out = self.embed_stage(segments.transpose(0, 1).reshape(S * B, seg), self.memory)
        h, ctx = out[0], tuple(out[1:])  # ctx (masks, positions, rotary tables) is the same for every segment
        h = h.reshape(S, B, *h.shape[1:])
        xs = torch.cat([h, h.new_zeros(L - 1, *h.shape[1:])])  # lane 0's input per step; drain steps read padding
        s = torch.arange(S + L - 1, device=h.device)[:, None] - torch.arange(L, device=h.device)[None, :]
        active = (s >= 0) & (s < S)  # lane l at step t holds segment t - l
        first = (s == 0) & fresh
        params = {n: getattr(self, f"stack{i}") for i, n in enumerate(self.stack_names)}
        ctx_lanes = [c.expand(L, *c.shape) for c in ctx]
        cell = self.cell

        def step(carry, x):
            prev, A_, z_ = carry
            x_t, act, fst = x
            lane_in = torch.cat([x_t.unsqueeze(0), prev[:-1]])  # lane l reads lane l - 1's output of the last step
            (o, A2, z2), _ = cell(params, [lane_in, A_, z_, fst, *ctx_lanes])
            A2 = torch.where(act.view(L, *([1] * (A_.dim() - 1))), A2, A_)
            z2 = torch.where(act.view(L, *([1] * (z_.dim() - 1))), z2, z_)
            return (o, A2, z2), o[-1].clone()

        with contextlib.ExitStack() as pins:
            for block, mine in self._lane_blocks(params):
                pins.enter_context(block.pinned(mine, L))
            (_, A_out, z_out), ys = scan(step, (h.new_zeros(L, *h.shape[1:]), A, z), (xs, active, first))
        top = ys[L - 1:, :, :seg]  # segment s left the top lane at step s + L - 1; memory rows dropped
        logits = self.lm_head(self.norm(top))
        return logits.transpose(0, 1).reshape(B, S * seg, logits.shape[-1]), A_out, z_out


    def _lane_blocks(self, params: dict):
        """(LaneBlock, the stacked parameters it reads) for each opaque block in the folded graph
        (Hugging Face layers): what its calls would pass as lane_params, resolved up front."""
        from wavefront.passes.module_fold import LaneBlock
        by_input = {"lane_" + n.replace(".", "_"): t for n, t in params.items()}
        out = []
        for node in self.folded.graph.nodes:
            if node.op == "call_module" and isinstance(self.folded.get_submodule(node.target), LaneBlock):
                mine = {k: by_input[v.target] for k, v in node.kwargs["lane_params"].items()}
                out.append((self.folded.get_submodule(node.target), mine))
        return out


def stacked_memory(memory_tensors, n_layers: int):
    """(A, z) stacked over layers from a MemoryState's (A_0, z_0, A_1, z_1, ...)."""
    return torch.stack(memory_tensors[0::2]), torch.stack(memory_tensors[1::2])


def unstacked_memory(A, z):
    """The MemoryState tensor order (A_0, z_0, A_1, z_1, ...) from stacked A and z."""
    return tuple(t for pair in zip(A.unbind(0), z.unbind(0)) for t in pair)


class OnnxSegmentSession:
    """Runs an exported diagonal program in onnxruntime with the model's call: `session(input_ids,
    memory=None) -> SegmentLMOutput`. Whole segments go through the graph; a shorter last segment
    is refused with the length to pass instead (padding it would change the memory it writes)."""

    def __init__(self, path: str, providers=("CPUExecutionProvider",)):
        import onnx
        import onnxruntime as ort
        meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        self.segment_len, self.n_layers = int(meta["wavefront.segment_len"]), int(meta["wavefront.n_layers"])
        self.session = ort.InferenceSession(path, providers=list(providers))
        missing = [p for p in providers if p not in self.session.get_providers()]
        if missing:
            raise RuntimeError(f"onnxruntime did not give the providers {missing} (it gave {self.session.get_providers()})")
        self.providers = self.session.get_providers()
        self.names = [i.name for i in self.session.get_inputs()]
        self.batch = self.session.get_inputs()[0].shape[0]  # fixed at export (an int), or symbolic (a str)
        self.d_key, self.d_model = (int(x) for x in meta["wavefront.memory_shape"].split(","))
        self.dtype = getattr(torch, meta["wavefront.dtype"].split(".")[-1])

    def __call__(self, input_ids: torch.Tensor, memory=None):
        from wavefront.models.segment import MemoryState, SegmentLMOutput, check_input_ids
        check_input_ids(input_ids)
        B, T = input_ids.shape
        if isinstance(self.batch, int) and B != self.batch:
            raise ValueError(f"this graph was exported for batch {self.batch}, got batch {B}: export again with an "
                             f"example of batch {B} (optimize(..., backend='onnxruntime') does that per batch)")
        if T % self.segment_len:
            raise ValueError(f"the exported graph runs whole segments of {self.segment_len} tokens; got {T} tokens: "
                             f"pass {T - T % self.segment_len} now and the rest with the next piece")
        if memory is None:
            A = torch.zeros(self.n_layers, B, self.d_key, self.d_model, dtype=self.dtype)
            z = torch.zeros(self.n_layers, B, self.d_key, dtype=self.dtype)
            seen = 0
        else:
            A, z = stacked_memory(memory.tensors, self.n_layers)
            seen = memory.segments_seen
        feed = dict(zip(self.names, [input_ids.reshape(B, -1, self.segment_len).numpy(), A.to(self.dtype).numpy(),
                                     z.to(self.dtype).numpy(), torch.tensor(seen == 0).numpy()]))
        logits, A2, z2 = (torch.from_numpy(x) for x in self.session.run(None, feed))
        return SegmentLMOutput(logits, MemoryState(unstacked_memory(A2, z2), seen + T // self.segment_len))


__all__ = ["DiagonalProgram", "OnnxSegmentSession", "stacked_memory", "unstacked_memory"]


def export_segments(optimized, example_inputs: tuple, path: str, *, dynamic: bool = True, check: bool = True):
    """export_onnx for a model optimize() put under the diagonal schedule (see the module docstring)."""
    import json

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
        expected = optimized(input_ids, memory)
    program = DiagonalProgram(optimized).eval()
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
            "wavefront.memory_shape": f"{A.shape[2]},{A.shape[3]}", "wavefront.dtype": str(dtype),
            "wavefront.dynamic": json.dumps(bool(dynamic))}
    save_with_metadata(proto, path, meta)
    if check:
        out = OnnxSegmentSession(path)(input_ids, memory)
        _check_in_onnxruntime(path, example_inputs, [expected.logits, *expected.memory.tensors],
                              got=[out.logits, *out.memory.tensors])
    return proto
