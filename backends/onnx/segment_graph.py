"""The torch side of an exported segment model: whole segments under the diagonal program, then
the last segment (1 to segment_len tokens) through the model's own cell.

A shorter last segment cannot share the program's Scan: its memory rows sit at another offset
and the model's own code decides what a short segment does (positions, masks, which rows the
memory write reads). So the last segment always runs as the user's cell, one segment of any
length, from the memory the program left; the whole segments before it run as the program. Any
token count T >= 1 then has one exact path: (T - 1) // segment_len whole segments, and a last
one of 1 to segment_len tokens. (A T that is a multiple of the segment length runs its last
segment through the cell, in L layer calls instead of sharing a diagonal step: the same result.)

The cell's layers read their weights from the program's stacks (torch.func.functional_call), so
the graph holds each layer weight once. graph_io.py puts the plain inputs around this module:
input_ids split into `segments` and `tail`, memory and segments_seen with defaults.

forward(segments [B, S, seg] int64, tail [B, r] int64 (1 <= r <= seg), segments_seen int64 [],
*stacked_state) -> (logits [B, S * seg + r, ...], segments_seen + S + 1, *stacked_state).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_leaves
from wavefront.backends.segment_program import SegmentProgram


class SegmentGraph(nn.Module):
    """Whole segments by `program` (own_copies=True), the last segment by `cell` (the model's own)."""

    def __init__(self, program: SegmentProgram, cell: nn.Module, state_from_leaves, stack):
        super().__init__()
        if not program.own_copies:
            raise ValueError("SegmentGraph exports a program holding its own stacks (own_copies=True)")
        self.program, self.cell = program, cell
        object.__setattr__(self, "state_from_leaves", state_from_leaves)
        self._weights = _layer_weights(program, cell, stack)

    def forward(self, segments, tail, segments_seen, *stacked):
        fresh = segments_seen == 0
        logits, *stacked = self.program(segments, *stacked, fresh)
        plan = self.program.plan
        # a tensor, not a Python bool of the symbolic S: torch.onnx (2.13) drops `tensor & SymBool`
        first = fresh & (torch.scalar_tensor(segments.shape[1], dtype=torch.int64) == 0)
        state = self.state_from_leaves(plan.unstack_state(stacked))
        weights = {name: get() for name, get in self._weights.items()}
        last, new_state = functional_call(self.cell, weights, (tail, first, state), strict=False)
        stacked = plan.stack_state(tree_leaves(new_state))
        return (torch.cat([logits, last], dim=1), segments_seen + segments.shape[1] + 1, *stacked)


def _layer_weights(program: SegmentProgram, cell: nn.Module, stack) -> dict:
    """{the cell's name of a layer tensor: a function giving it from the program's own stacks}:
    layer l's tensor `n` is stack n's row l (a joint storage: row l, the name's span). The
    stack's modules are the captured layer graphs, sharing the cell's tensor objects."""
    where = {id(t): name for name, t in [*cell.named_parameters(remove_duplicate=False),
                                         *cell.named_buffers(remove_duplicate=False)]}
    by_stack = {n: i for i, n in enumerate(program.stack_names)}
    joint = {n: (k, span) for k, group in enumerate(stack.joint) for n, span in zip(group, stack.joint_spans[k])}
    out = {}
    for l, module in enumerate(stack.modules):
        tensors = dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
        for n in stack.names:
            name = where.get(id(tensors[n]))
            if name is None:
                continue
            if n in by_stack:
                buf = f"stack{by_stack[n]}"
                out[name] = (lambda b=buf, l=l: getattr(program, b)[l])
            elif n in joint:
                k, (off, size) = joint[n]
                buf = f"stack{by_stack[f'joint{k}']}"
                out[name] = (lambda b=buf, l=l, off=off, size=size: getattr(program, b)[l, off:off + size])
    return out


__all__ = ["SegmentGraph"]
