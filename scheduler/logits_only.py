"""A segment cell traced with its logits as its only output: what generate()'s decode calls run
when they do not end a segment.

A decode call that leaves its segment unfinished discards the memory the cell writes (only the
call that fills the segment hands its memory on), so the cell's write is dead code there. The
cell is traced with torch.fx, its layers' own code (read, write, glue) as ops and every module
they call (blocks, projections, the embed stage) kept as one call, which runs live: a block
that consults the key/value window does so when the graph runs, never at trace time (a trace
that would consult it fails, wavefront/contract/kv_window.py). The output is cut to the logits
and torch.fx's dead-code elimination drops what only the memory needed. The same ops compute the
logits in the same order, and the decoder's check proves the graph against the cell's own run
before generate() uses it (wavefront/kv_decode.py).

>>> from wavefront.models import ARMT, ARMTConfig
>>> cell = ARMT(ARMTConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, segment_len=4, n_mem_tokens=2, d_mem=4)).cell
>>> logits_only = logits_only_cell(cell)
>>> ids = torch.zeros(1, 3, dtype=torch.long)
>>> state = cell.initial_state(1, torch.float32, "cpu")
>>> torch.equal(logits_only(ids, torch.tensor(True), state), cell(ids, torch.tensor(True), state)[0])
True
"""
from __future__ import annotations

import inspect
import operator

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from wavefront.scheduler.capture import CaptureError, trace_module

from wavefront.contract.kv_window import window_at_trace_time

_CALLS = ("call_function", "call_method", "call_module")
_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor}


def _writes_in_place(node: fx.Node) -> bool:
    """An op that may change a tensor it is given (x.mul_(2), x[i] = v, relu(x, inplace=True), out=):
    torch.fx's dead-code elimination drops such a call_method when its result is unused, though what
    it changed may be read later."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op in ("call_method", "call_function") and name.endswith("_") and not name.startswith("__"):
        return True
    return node.target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True or "out" in node.kwargs


def logits_only_cell(cell: nn.Module) -> fx.GraphModule:
    """`cell(input_ids, first, state)`'s logits with nothing computed only for the state it writes;
    CaptureError if the cell does not trace so, or nothing is left out (no gain over the cell)."""
    layers = list(cell.layers)
    kept = [m for m in cell.children() if m is not cell.layers] + [c for layer in layers for c in layer.children()]
    leaves, spec = tree_flatten(cell.initial_state(1, torch.float32, "cpu"))
    state_arg = list(inspect.signature(cell.forward).parameters)[2]
    traced: list = []
    with window_at_trace_time():
        gm = trace_module(cell, leaves=kept, what="cell (logits only)", traced=traced,
                          concrete_args={state_arg: tree_unflatten([fx.PH] * len(leaves), spec)})
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    out = tree_unflatten(list(out_node.args[0]), gm._out_spec)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], fx.Node)):
        raise CaptureError("the cell's output is not (logits, state)")
    before = [n for n in gm.graph.nodes if n.op in _CALLS]
    out_node.args = (type(out_node.args[0])([out[0]]),)
    gm.graph._codegen.pytree_info = gm.graph._codegen.pytree_info._replace(out_spec=tree_flatten(out[0])[1])
    gm.graph.eliminate_dead_code()
    left = {n for n in gm.graph.nodes if n.op in _CALLS}
    dropped = [n for n in before if n not in left]
    if not dropped:
        raise CaptureError("every op of the cell feeds its logits: nothing to leave out")
    in_place = [f"{n.op} {getattr(n.target, '__name__', n.target)}" for n in dropped if _writes_in_place(n)]
    if in_place:
        raise CaptureError(f"an op left out writes in place ({in_place[0]}): what it changes may be read later")
    gm.recompile()
    gm.traced_modules = tuple(dict.fromkeys(traced))  # whose forward the trace ran (their hooks it did not)
    return gm


__all__ = ["logits_only_cell"]
