"""The diagonal schedule as one program: the batched cell in a scan over the L + S - 1 steps.

Step t runs lane l on segment t - l, the active lanes as one call of the lane-folded batched
cell (the FoldLaneCell the step-by-step executor runs too; compiled when backend="inductor" set
it up). Run eagerly, each step runs only its active lanes (a contiguous range, sliced). Exported,
the steps are one scan op whose body has one shape, so every step runs all L lanes: lanes
outside 0 <= t - l < S (warm-up and drain) compute on padding and their memory update is
discarded (torch.where); the result is the schedule's, exactly, either way. The carry holds the lanes' outputs from the previous step
(lane l reads lane l - 1's) and the memory stacked on a leading layer dim; the top lane's output
of step t is segment t - L + 1's. Nothing is gathered or split per cell, and there are no
per-cell calls around the layers: on small layers this is about twice as fast as the
step-by-step executor (dispatch-bound preset: 0.15 s vs 0.28 s), and it is the form that
exports to ONNX (one Scan node, any S). (torch.compile of the whole program does not work in
torch 2.13: inductor's scan lowering fails on the dynamic step count, KeyError on a size symbol.)

forward(segments [batch, S, segment_len], A [L, batch, d_key, d], z [L, batch, d_key], fresh)
-> (logits [batch, S * segment_len, vocab], A, z). Whole segments only.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .step_timer import maybe_step


class ProgramNotApplicable(Exception):
    """This optimized model cannot run as one program (the reason says why)."""


class DiagonalProgram(nn.Module):
    """An optimized ARMT (one layer kind, lane-folded cell) as one program. Built from what
    optimize() returned (or its TorchExecutor: anything with .rg and .batched), after at least
    one call with two or more lanes in a step (the folded cell checks itself against vmap on its
    first multi-lane call; that must happen eagerly).

    own_copies=True (export) keeps the stacked parameters as buffers of its own; False (the
    torch backend) reads the live stacks, the model's own storage, on every call.
    """

    def __init__(self, optimized, own_copies: bool = False):
        super().__init__()
        batched, rg = optimized.batched, optimized.rg
        if batched is None:
            raise ProgramNotApplicable("only the diagonal schedule runs as one program (this model was optimized "
                                       "with schedule='sequential')")
        if len(batched.groups) != 1:
            raise ProgramNotApplicable(f"the layer stack has {len(batched.groups)} layer kinds (a hybrid stack): one "
                                       "program runs one batched cell per step, so all layers must be of one kind")
        group = batched.groups[0]
        if getattr(group.cell, "mode", "") != "fold":
            why = getattr(group.cell, "fallback_reason", "") or f"its batched cell runs as {group.cell.mode!r}"
            raise ProgramNotApplicable(f"the batched cell is not lane-folded: {why} (vmap inside a scan does not lower)")
        if not group.cell.checked:
            raise ProgramNotApplicable("the lane-folded cell has not checked itself yet: run the model once with two "
                                       "or more full segments per step first")
        cell = rg.cell
        parts = ("embed_stage", "layers", "norm", "lm_head", "memory", "n_mem_tokens")
        if not all(hasattr(cell, p) for p in parts):
            raise ProgramNotApplicable(f"the cell ({type(cell).__name__}) is not an ARMT cell with {', '.join(parts)}: "
                                       "the program knows ARMT's layer call (h, A, z, first, ctx) -> (h, A, z)")
        self.n_layers = len(cell.layers)
        self.embed_stage, self.norm, self.lm_head, self.memory = cell.embed_stage, cell.norm, cell.lm_head, cell.memory
        object.__setattr__(self, "cell", group.cell)  # not a submodule: its layer templates alias the model's
        self.folded = group.cell.folded  # registered: the graph's own constants are traced as this module's
        self.stack_names = list(group.cell.param_names)
        object.__setattr__(self, "stack", group.stack)
        self.own_copies = own_copies
        if own_copies:
            with torch.no_grad():  # the stacks as buffers of their own (export lifts them into initializers)
                for i, t in enumerate(group.stack.slices(0, self.n_layers, self.stack_names).values()):
                    self.register_buffer(f"stack{i}", t.detach().clone())
        object.__setattr__(self, "lane_blocks", self._find_lane_blocks())
        self.step_timer = None  # a StepTimer while profile() runs (eager steps only)

    def forward(self, segments, A, z, fresh):
        B, S, seg = segments.shape
        L = self.n_layers
        out = self.embed_stage(segments.transpose(0, 1).reshape(S * B, seg), self.memory)
        h, ctx = out[0], tuple(out[1:])  # ctx (masks, positions, rotary tables) is the same for every segment
        h = h.reshape(S, B, *h.shape[1:])
        s = torch.arange(S + L - 1, device=h.device)[:, None] - torch.arange(L, device=h.device)[None, :]
        first = (s == 0) & fresh  # lane l at step t holds segment t - l
        if self.own_copies:
            params = {n: getattr(self, f"stack{i}") for i, n in enumerate(self.stack_names)}
        else:
            params = self.stack.slices(0, L, self.stack_names)
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():  # one scan op: any S, no unrolling
            ys, A_out, z_out = self._scan_steps(h, A, z, first, (s >= 0) & (s < S), params, ctx)
            top = ys[L - 1:, :, :seg]  # segment s left the top lane at step s + L - 1; memory rows dropped
        else:  # eager: a Python loop (torch's scan would send its body through dynamo) over active lanes only
            ys, A_out, z_out = self._eager_steps(h, A, z, first, params, ctx)
            top = ys[:, :, :seg]
        logits = self.lm_head(self.norm(top))
        return logits.transpose(0, 1).reshape(B, S * seg, logits.shape[-1]), A_out, z_out

    def _scan_steps(self, h, A, z, first, active, params, ctx):
        """All L + S - 1 steps as one scan op with every lane in every step (padding masked):
        (top lane's output per step, A, z)."""
        from torch._higher_order_ops.scan import scan
        L, cell = self.n_layers, self.cell
        xs = torch.cat([h, h.new_zeros(L - 1, *h.shape[1:])])  # lane 0's input per step; drain steps read padding
        ctx_lanes = [c.expand(L, *c.shape) for c in ctx]

        def step(carry, x):
            prev, A_, z_ = carry
            x_t, act, fst = x
            lane_in = torch.cat([x_t.unsqueeze(0), prev[:-1]])  # lane l reads lane l - 1's output of the last step
            (o, A2, z2), _ = cell.run_folded(params, [lane_in, A_, z_, fst, *ctx_lanes])
            A2 = torch.where(act.view(L, *([1] * (A_.dim() - 1))), A2, A_)
            z2 = torch.where(act.view(L, *([1] * (z_.dim() - 1))), z2, z_)
            return (o, A2, z2), o[-1].clone()

        with contextlib.ExitStack() as pins:
            for block, names in self.lane_blocks:
                pins.enter_context(block.pinned({k: params[n] for k, n in names.items()}, L))
            (_, A_out, z_out), ys = scan(step, (h.new_zeros(L, *h.shape[1:]), A, z), (xs, active, first))
        return ys, A_out, z_out

    def _eager_steps(self, h, A, z, first, params, ctx):
        """The steps with only each step's active lanes lo..hi-1 (lo = max(0, t - S + 1),
        hi = min(L, t + 1)): warm-up and drain compute no padding. The lanes are a contiguous
        range, so parameters, memory and hidden states are slices (views), never gathered.
        Returns (the top lane's output for each segment, A, z)."""
        L, S = self.n_layers, h.shape[0]
        A_out, z_out = A.clone(), z.clone()  # the caller's A, z stay as they were
        prev = h.new_zeros(L, *h.shape[1:])  # lane l's output of the last step
        outs = []
        for t in range(L + S - 1):
            with maybe_step(self.step_timer, t):
                lo, hi = max(0, t - S + 1), min(L, t + 1)
                mine = params if hi - lo == L else {n: v[lo:hi] for n, v in params.items()}
                lane_in = prev[lo - 1:hi - 1] if lo else torch.cat([h[t].unsqueeze(0), prev[:hi - 1]])
                lane_ctx = [c.expand(hi - lo, *c.shape) for c in ctx]
                (o, A2, z2), _ = self.cell.run_folded(
                    mine, [lane_in, A_out[lo:hi], z_out[lo:hi], first[t, lo:hi], *lane_ctx], compiled=True)
                if hi - lo == L:  # every lane ran: take the step's results as they are (inference only, so
                    A_out, z_out, prev = A2, z2, o  # later in-place writes into them trouble no autograd graph)
                else:
                    A_out[lo:hi], z_out[lo:hi] = A2, z2
                    prev[lo:hi] = o
                if hi == L:
                    outs.append(o[-1].clone())
        return torch.stack(outs), A_out, z_out

    def _find_lane_blocks(self):
        """(LaneBlock, {its parameter: stack name}) for each opaque block in the folded graph
        (Hugging Face layers): what its calls pass as lane_params, found once here, so that a
        compiled forward never reads the graph (dynamo cannot trace GraphModule.graph)."""
        from wavefront.passes.module_fold import LaneBlock
        by_input = {"lane_" + n.replace(".", "_"): n for n in self.stack_names}
        out = []
        for node in self.folded.graph.nodes:
            if node.op == "call_module" and isinstance(self.folded.get_submodule(node.target), LaneBlock):
                out.append((self.folded.get_submodule(node.target),
                            {k: by_input[v.target] for k, v in node.kwargs["lane_params"].items()}))
        return out


def stacked_memory(memory_tensors, n_layers: int):
    """(A, z) stacked over layers from a MemoryState's (A_0, z_0, A_1, z_1, ...)."""
    return torch.stack(memory_tensors[0::2]), torch.stack(memory_tensors[1::2])


def unstacked_memory(A, z):
    """The MemoryState tensor order (A_0, z_0, A_1, z_1, ...) from stacked A and z."""
    return tuple(t for pair in zip(A.unbind(0), z.unbind(0)) for t in pair)


__all__ = ["DiagonalProgram", "ProgramNotApplicable", "stacked_memory", "unstacked_memory"]
