"""Recognise a loop with several carries that run as separate scans: an optional running max
(xLSTM's mLSTM step loop, exponential gating in general) and values each affine in itself once
the max is known.

Exponential gates overflow, so such loops keep a stabiliser: a carry m updated as
    m' = max(m + lw, lk)          (lw, lk free of the carries)
and the other carries scaled by exponentials of m and m' (C' = e^{lf + m - m'} C + e^{i - m'} k v^T).
No carry but m reaches m', so m for every step is a max-plus scan (Hillis-Steele, like the
chunked log-space scans). With m known (or without one), each other carry must be affine in
itself alone, c' = a(m, x) c + b(m, x), a and b read off the loop's own ops with m as an input
(affine_carry.py proves it op by op): a first-order linear scan each. The per-step outputs may
read the carries in any way (mLSTM reads C^T q / (max(|n . q|, e^{-m}) + eps), which depends on m
itself through eps): they are the loop's own output ops, evaluated for every step at once from
the scanned carries.

Exact: the maxima are the loop's (sums taken in another order: equal up to rounding), and every
stabilised value is the loop's own update evaluated at them, so a stabilised value and its scale
always agree. The scans hold every step's carries (bounded by WAVEFRONT_SCAN_MEMORY_GB, like the
generic scan); a running-max pair read out as a plain ratio runs chunked instead (logspace_state.py).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from wavefront.time_loops.affine_carry import (
    AffineStep,
    NotAffine,
    _ancestors,
    analyse_step,
    declared_dtype,
    value_dtype,
)

_MAXIMA = {torch.max, torch.maximum}
_ADDS = {operator.add, torch.add}
# Ops that leave the value as it is (up to a dtype, as the affine analysis takes them).
_PASS = {"to", "type", "float", "double", "contiguous", "clone"}


@dataclass
class SeveralCarriesStep:
    """The parts of a several-carry loop's traced step (placeholders: carries, index, *tensors;
    outputs: new carries, *per-step outputs).

    max: the position of the running max carry, or None; lw, lk: graphs of (index, *tensors), or
    numbers, with m' = max(m + lw, lk); others: (position, AffineStep of (carry, previous max,
    index, *tensors), without the max when there is none) for every other carry; ys: graph of
    (*previous carries, *new carries, index, *tensors) for the per-step outputs, None without any;
    max_dtype: the dtype the step converts its new max to."""

    max: int | None
    lw: fx.GraphModule | float | None
    lk: fx.GraphModule | float | None
    others: list[tuple[int, AffineStep]]
    ys: fx.GraphModule | None
    max_dtype: torch.dtype | None = None


def _through(node):
    """`node` with value-preserving methods (.to, .clone, ...) on it looked through."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _PASS:
        node = node.args[0]
    return node


def _graph(traced: fx.GraphModule, inputs: list, output) -> fx.GraphModule:
    """A graph of `inputs` (placeholders of `traced`, in this order; or (name, node) pairs whose
    node's value becomes a new input) computing `output` (a node, number or tuple of them) with
    traced's ops."""
    graph, env = fx.Graph(), {}
    for x in inputs:
        name, node = x if isinstance(x, tuple) else (x.name, x)
        env[node] = graph.placeholder(name)
    needed: set = set()
    fx.node.map_arg(output, lambda a: needed.update(_upstream(a, env)))
    for n in traced.graph.nodes:
        if n in needed and n not in env and n.op != "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(fx.node.map_arg(output, lambda a: env[a]))
    gm = fx.GraphModule(traced, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _upstream(node: fx.Node, stop) -> set:
    """`node` and what it is computed from, not looking past the nodes in `stop`."""
    seen, todo = {node}, [node]
    while todo:
        n = todo.pop()
        if n in stop:
            continue
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _part(traced, value, free_inputs):
    """A number stays a number; a node becomes a graph of (index, *tensors)."""
    return _graph(traced, free_inputs, value) if isinstance(value, fx.Node) else float(value)


def match_several_carries(traced: fx.GraphModule, n_carries: int) -> SeveralCarriesStep | None:
    """The parts of a loop whose carries are a running max and values affine in themselves once
    it is known, or values each affine in itself (see the module docstring); None otherwise."""
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    carries, free_inputs = placeholders[:n_carries], placeholders[n_carries:]
    out = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    if n_carries < 2 or not isinstance(out, (tuple, list)) or len(out) < n_carries:
        return None
    new, ys = list(out[:n_carries]), list(out[n_carries:])
    if not all(isinstance(v, fx.Node) for v in new):
        return None
    carry_set = set(carries)
    candidates = [(mi, _max_update(_through(new[mi]), carries[mi], carry_set)) for mi in range(n_carries)]
    candidates = [(mi, parts) for mi, parts in candidates
                  if parts is not None and (_ancestors(new[mi]) & carry_set) == {carries[mi]}]
    for mi, parts in [*candidates, (None, None)]:  # a running max, else none
        others = []
        try:
            for k in range(n_carries):
                if k == mi:
                    continue
                allowed = {carries[k]} | ({carries[mi]} if mi is not None else set())
                if not (_ancestors(new[k]) & carry_set) <= allowed:
                    raise NotAffine("reads another value carry")
                previous_max = [("wf_previous_max", carries[mi])] if mi is not None else []
                step = _graph(traced, [carries[k], *previous_max, *free_inputs], new[k])
                others.append((k, analyse_step(step)))
        except NotAffine:
            continue
        ys_graph = None
        if ys:
            new_inputs = [(f"wf_new_{c.name}", v) for c, v in zip(carries, new)]
            ys_graph = _graph(traced, [*carries, *new_inputs, *free_inputs], tuple(ys))
        if mi is None:
            return SeveralCarriesStep(None, None, None, others, ys_graph)
        lw, lk = parts
        return SeveralCarriesStep(mi, _part(traced, lw, free_inputs), _part(traced, lk, free_inputs), others,
                                  ys_graph, value_dtype(new[mi]) or declared_dtype(new[mi]))
    return None


def _max_update(node, m: fx.Node, carries: set):
    """(lw, lk) when `node` is max(m + lw, lk) or max(m, lk) (lw = 0) (either order; torch.max or
    torch.maximum of two tensors) with lw, lk free of the carries, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _MAXIMA and len(node.args) == 2 and not node.kwargs:
        u, v = node.args
    elif node.op == "call_method" and node.target == "maximum" and len(node.args) == 2 and not node.kwargs:
        u, v = node.args
    else:
        return None
    if not (isinstance(u, fx.Node) and isinstance(v, fx.Node)):
        return None  # torch.max(x, dim) is a reduction
    for decayed, incoming in ((u, v), (v, u)):
        if (_ancestors(incoming) & carries):
            continue
        d = _through(decayed)
        if d is m:  # max(m, lk): a running max without decay
            return 0.0, incoming
        if not (isinstance(d, fx.Node) and d.op in ("call_function", "call_method")
                and (d.target in _ADDS or d.target == "add") and len(d.args) == 2 and not d.kwargs):
            continue
        a, b = d.args
        for mine, lw in ((a, b), (b, a)):
            if _through(mine) is m and not (isinstance(lw, fx.Node) and (_ancestors(lw) & carries)):
                return lw, incoming
    return None


__all__ = ["SeveralCarriesStep", "match_several_carries"]
