"""Hoist a loop body's reads `x[:, i]` out of the per-step function.

Evaluating a loop body for every index at once with vmap turns each `x[:, :, i, :]` into a
gather, a full copy of x per read. With the index running over a range, the same values are
a strided view: x.movedim(2, 0)[start:stop:step]. This rewrite replaces every such read of an
input by a new input (fed that view, batched on dim 0), so the vmapped body reads memory
in place; other uses of the index (i - 1, arithmetic) keep the gather.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx


@dataclass
class HoistedReads:
    """`gm` takes its original inputs, then one view per read in `reads` ((input position, dim))."""

    gm: fx.GraphModule
    reads: list[tuple[int, int]]
    original: fx.GraphModule  # the graph before hoisting, for ranges a view cannot express


def _index_dim(key, index: fx.Node) -> int | None:
    parts = key if isinstance(key, tuple) else (key,)
    at = [k for k, p in enumerate(parts) if p is index]
    rest = all(isinstance(p, slice) and p == slice(None) for k, p in enumerate(parts) if k not in at)
    return at[0] if len(at) == 1 and rest else None


def hoist_index_reads(gm: fx.GraphModule, index_name: str) -> HoistedReads:
    """Rewrite (a copy of) `gm`, whose input `index_name` is the loop index, so that reads
    `x[:, ..., index]` of the inputs after it (the loop-invariant tensors) come in as inputs
    of their own."""
    graph = fx.Graph()
    env = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in placeholders:
        env[n] = graph.node_copy(n, lambda a: env[a])
    at = next((k for k, n in enumerate(placeholders) if n.name == index_name), None)
    index = env[placeholders[at]] if at is not None else None
    position = {env[n]: k for k, n in enumerate(placeholders) if at is not None and k > at}
    last = env[placeholders[-1]] if placeholders else None
    reads: list[tuple[int, int]] = []
    by_read: dict = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "call_function" and n.target is operator.getitem and index is not None:
            src = env.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
            key = fx.node.map_arg(n.args[1], lambda a: env[a])
            dim = _index_dim(key, index) if src in position else None
            if dim is not None:
                read = (position[src], dim)
                if read not in by_read:
                    with graph.inserting_after(last):
                        last = by_read[read] = graph.placeholder(f"wf_read_{src.name}_{dim}")
                    reads.append(read)
                env[n] = by_read[read]
                continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    out = fx.GraphModule(gm, graph)
    out.graph.eliminate_dead_code()
    out.recompile()
    return HoistedReads(out, reads, gm)


def read_views(reads: list[tuple[int, int]], args: list, rng: range) -> list[torch.Tensor] | None:
    """The views that feed a HoistedReads' extra inputs for the indices `rng` (step 0 first),
    or None when a view cannot express them (negative indices wrap around in a read)."""
    if len(rng) == 0 or min(rng[0], rng[-1]) < 0:
        return None
    lo, hi, step = min(rng[0], rng[-1]), max(rng[0], rng[-1]) + 1, abs(rng.step)
    views = []
    for pos, dim in reads:
        x = args[pos]
        if hi > x.shape[dim]:
            return None  # out of range: let the gather raise the loop's own IndexError
        v = x.movedim(dim, 0)[lo:hi:step]
        views.append(v if rng.step > 0 else v.flip(0))
    return views


__all__ = ["HoistedReads", "hoist_index_reads", "read_views"]
