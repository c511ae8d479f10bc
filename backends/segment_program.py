"""The diagonal schedule as one program: a segment model's batched layer in a loop over steps.

Built from a SegmentPlan (passes/segment_plan.py: the cell's pre part, its layer call's inputs
and outputs, its post part and state layout, read off the captured graph) and the schedule's
lowering (LaneSteps: lane l holds segment t - l at step t). The pre part runs once on every
segment's rows, the post part once on every segment's top-lane output; in between, each step is
one call of the lane-folded batched cell on the active lanes. The carry holds the lanes'
outputs of the previous step (lane l reads lane l - 1's) and each state position stacked over
the layers. Nothing is gathered or split per cell, and there are no per-cell calls around the
layers: on small layers that is about twice as fast as the step-by-step executor.

Run eagerly, each step runs only its active lanes (a contiguous range: parameters, memory and
hidden values are slices). Exported (torch.export / ONNX), the steps are one scan op whose body
has one shape, so every step runs all L lanes; lanes outside 0 <= t - l < S (warm-up and
drain) compute on padding and their state update is discarded (torch.where): the result is
the schedule's either way, and one graph serves any S. (torch.compile of the whole program
fails in torch 2.13: inductor's scan lowering trips on the dynamic step count.)

forward(segments [batch, S, segment_len], *stacked_state, fresh) -> (logits [batch, S *
segment_len, ...], *stacked_state). Whole segments only.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from wavefront.backends.step_timer import maybe_step
from wavefront.passes.lanes.block_clones import LaneBlock
from wavefront.passes.segment_plan import ProgramNotApplicable, SegmentPlan
from wavefront.scheduler.schedule import LaneSteps


class SegmentProgram(nn.Module):
    """One program for a diagonal-batched segment model with one lane-folded layer kind.

    own_copies=True (export) keeps the stacked parameters as buffers of its own; False (the
    torch backend) reads the live stacks, the model's own storage, on every call.
    """

    def __init__(self, plan: SegmentPlan, group, own_copies: bool = False):
        super().__init__()
        if plan.pre_rows is None:
            raise ValueError("classify the plan's pre outputs on a real input first (SegmentPlan.classify)")
        if getattr(group.cell, "mode", "") != "fold":
            why = getattr(group.cell, "fallback_reason", "") or f"its batched cell runs as {group.cell.mode!r}"
            raise ProgramNotApplicable(f"the batched cell is not lane-folded: {why} (vmap inside a scan does not lower)")
        object.__setattr__(self, "plan", plan)
        self.pre, self.post = plan.pre, plan.post  # registered: their parameters are the model's
        self.lanes = LaneSteps(plan.n_layers)
        self.n_layers = plan.n_layers
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

    def forward(self, segments, *state_and_fresh):
        *state, fresh = state_and_fresh
        B, S, seg = segments.shape
        L, plan = self.n_layers, self.plan
        pre = self.pre(segments.transpose(0, 1).reshape(S * B, seg))
        # per pre output: [S, B, ...] (per row) or as it is (one value for every segment)
        pre = [v.reshape(S, B, *v.shape[1:]) if rows else v for v, rows in zip(pre, plan.pre_rows)]
        first = (self.lanes.segment_grid(S, segments.device) == 0) & fresh  # [steps, lanes]
        if self.own_copies:
            params = {n: getattr(self, f"stack{i}") for i, n in enumerate(self.stack_names)}
        else:
            params = self.stack.slices(0, L, self.stack_names)
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():  # one scan op: any S, no unrolling
            tops, state = self._scan_steps(pre, list(state), first, params, S)
            tops = [y[L - 1:] for y in tops]  # segment s left the top lane at step s + L - 1
        else:  # eager: a Python loop (torch's scan would send its body through dynamo) over active lanes only
            tops, state = self._eager_steps(pre, list(state), first, params, S)
        logits = self._post(tops, pre, segments, S, B)
        return (logits, *state)

    def _post(self, tops, pre, segments, S, B):
        """The post part on every segment's rows at once -> logits [B, S * tokens, ...]."""
        args = []
        for role, i in self.plan.post_inputs:
            if role == "top":
                args.append(tops[self._top_keys.index(i)].flatten(0, 1))
            elif role == "pre":
                args.append(pre[i].flatten(0, 1) if self.plan.pre_rows[i] else pre[i])
            else:
                args.append(segments.transpose(0, 1).reshape(S * B, -1))
        (logits,) = self.post(*args)
        return logits.reshape(S, B, *logits.shape[1:]).movedim(0, 1).flatten(1, 2)

    @property
    def _top_keys(self) -> list[int]:
        """The top layer's output leaves the post part reads."""
        return sorted({i for role, i in self.plan.post_inputs if role == "top"})

    def _lane_values(self, pre, reversed_pre, prev, state, first_t, lo, hi, S, t):
        """The layer call's per-lane values for lanes lo..hi-1 at step t (eager form)."""
        n = hi - lo
        values = []
        for k, x in enumerate(self.plan.lane_inputs):
            if x.role == "hidden":
                values.append(prev[k][lo - 1:hi - 1] if lo else torch.cat([pre[x.pre][t].unsqueeze(0), prev[k][:hi - 1]]))
            elif x.role == "state":
                values.append(state[x.index][lo:hi])
            elif x.role == "first":
                values.append(first_t[lo:hi])
            elif self.plan.pre_rows[x.pre]:  # per-row ctx: lane l holds segment t - l (a reversed, contiguous range)
                values.append(reversed_pre[x.pre][S - 1 - t + lo:S - 1 - t + hi])
            else:
                values.append(pre[x.pre].expand(n, *pre[x.pre].shape))
        return values

    def _eager_steps(self, pre, state, first, params, S):
        """The steps with only each step's active lanes: warm-up and drain compute no padding.
        Returns (per top output leaf the post reads: [S, ...], the stacked state)."""
        L, plan = self.n_layers, self.plan
        state = [s.clone() for s in state]  # the caller's memory stays as it was
        hidden = plan.hidden
        h0 = {k: pre[x.pre] for k, x in hidden}
        prev = {k: h0[k].new_zeros(L, *h0[k].shape[1:]) for k, _ in hidden}  # lane l's output of the last step
        reversed_pre = {x.pre: pre[x.pre].flip(0) for x in plan.lane_inputs if x.role == "ctx" and plan.pre_rows[x.pre]}
        keys = self._top_keys
        tops = {k: [] for k in keys}
        for t in range(self.lanes.num_steps(S)):
            with maybe_step(self.step_timer, t):
                lo, hi = self.lanes.active(t, S)
                mine = params if hi - lo == L else {n: v[lo:hi] for n, v in params.items()}
                values = self._lane_values(pre, reversed_pre, prev, state, first[t], lo, hi, S, t)
                out, _ = self.cell.run_folded(mine, values, compiled=True)
                new_state = [out[k] for k in plan.state_out_leaf]
                if hi - lo == L:  # every lane ran: take the step's results as they are (inference only, so
                    state = new_state  # later in-place writes into them trouble no autograd graph)
                    prev = {k: out[x.index] for k, x in hidden}
                else:
                    for s, v in zip(state, new_state):
                        s[lo:hi] = v
                    for k, x in hidden:
                        prev[k][lo:hi] = out[x.index]
                if hi == L:
                    for k in keys:
                        tops[k].append(out[k][-1].clone())
        return [torch.stack(tops[k]) for k in keys], state

    def _scan_steps(self, pre, state, first, params, S):
        """All L + S - 1 steps as one scan op with every lane in every step (padding masked)."""
        from torch._higher_order_ops.scan import scan
        L, plan = self.n_layers, self.plan
        grid = self.lanes.segment_grid(S, first.device)
        active = (grid >= 0) & (grid < S)
        shifted = [k for k, x in enumerate(plan.lane_inputs)  # values that move one lane down each step
                   if x.role == "hidden" or (x.role == "ctx" and plan.pre_rows[x.pre])]

        def padded(v):  # lane 0's value per step; drain steps read padding
            return torch.cat([v, v.new_zeros(L - 1, *v.shape[1:])])

        xs = [padded(pre[plan.lane_inputs[k].pre]) for k in shifted]
        keys = self._top_keys

        def step(carry, x):
            prev, st = carry[:len(shifted)], carry[len(shifted):]
            x_in, act, fst = x[:len(shifted)], x[-2], x[-1]
            lane_in = {k: torch.cat([x_in[i].unsqueeze(0), prev[i][:-1]]) for i, k in enumerate(shifted)}
            values = []
            for k, li in enumerate(plan.lane_inputs):
                if k in lane_in:
                    values.append(lane_in[k])
                elif li.role == "state":
                    values.append(st[li.index])
                elif li.role == "first":
                    values.append(fst)
                else:
                    values.append(pre[li.pre].expand(L, *pre[li.pre].shape))
            out, _ = self.cell.run_folded(params, values)
            new_prev = [out[plan.lane_inputs[k].index] if plan.lane_inputs[k].role == "hidden" else lane_in[k]
                        for k in shifted]
            new_st = [torch.where(act.view(L, *([1] * (s.dim() - 1))), out[leaf], s)
                      for s, leaf in zip(st, plan.state_out_leaf)]
            return (*new_prev, *new_st), tuple(out[k][-1].clone() for k in keys)

        init = [v.new_zeros(L, *v.shape[1:]) for v in xs]
        with contextlib.ExitStack() as pins:
            for block, names in self.lane_blocks:
                pins.enter_context(block.pinned({k: params[n] for k, n in names.items()}, L))
            carry, ys = scan(step, (*init, *state), (*xs, active, first))
        return list(ys), list(carry[len(shifted):])

    def _find_lane_blocks(self):
        """(LaneBlock, {its parameter: stack name}) for each opaque block in the folded graph
        (Hugging Face layers): what its calls pass as lane_params, found once here, so that a
        compiled forward never reads the graph (dynamo cannot trace GraphModule.graph)."""
        by_input = {"lane_" + n.replace(".", "_"): n for n in self.stack_names}
        out = []
        for node in self.folded.graph.nodes:
            if node.op == "call_module" and isinstance(self.folded.get_submodule(node.target), LaneBlock):
                out.append((self.folded.get_submodule(node.target),
                            {k: by_input[v.target] for k, v in node.kwargs["lane_params"].items()}))
        return out


__all__ = ["ProgramNotApplicable", "SegmentProgram"]
