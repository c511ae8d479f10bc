"""Recognise a delta-rule loop in a lifted loop body, so it runs as the chunked delta-rule scan.

A loop S = a S;  S = S + beta k (v - S^T k)^T with the output o = S^T q (DeltaNet, gated
DeltaNet, KDA with a per-key-dim a) is affine in S, but through a data matrix:
S_new = (I - beta k k^T) a S + beta k v^T. The elementwise analysis (affine_carry.py) rightly
finds no a(x) * S + b(x) form; this matcher finds the delta rule's own structure in the traced
step instead, and backends/scans/delta runs it (matmuls inside chunks, no T states held).

Recognised, structurally, in the traced step of carry S:
  decay (optional):  S1 = a * S  (a free of S)
  update:            S1 + <product of factors>, the factors containing an outer product
                     k' (x) e' (unsqueeze / [..., None] / einsum / matmul spellings, as in
                     matrix_state.py) whose e' factors contain v - S1^T k and whose k' factors
                     contain that same k; every other factor (beta) free of S
  output:            one readout S_new^T q (matrix_state.py's spellings)
Other spellings keep the loop as it is, with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from wavefront.time_loops.matrix_state import (
    MATMUL,
    MUL,
    _ancestors,
    _einsum,
    _is,
    _readout,
    _subgraph,
    _unsqueezed,
)

SUB = (operator.sub, torch.sub)
ADD = (operator.add, torch.add)


@dataclass
class DeltaStep:
    """The parts of a delta-rule step as graphs of (index, *tensors): the decay a (None: 1), the
    key k, the value v, the query q, and the factors whose product is beta: (graph or number, the
    side it multiplies: "state", "key" or "value")."""

    a: fx.GraphModule | None
    k: fx.GraphModule
    v: fx.GraphModule
    q: fx.GraphModule
    beta: list


def _factors(node) -> list:
    """The factors of a product tree (a single factor when node is not a product)."""
    if _is(node, MUL, "mul") and len(node.args) == 2 and not node.kwargs:
        return _factors(node.args[0]) + _factors(node.args[1])
    return [node]


def _outer_parts(factors: list):
    """(k', e', the other factors) when the factors hold one outer product k' (x) e'."""
    for f in factors:
        pair = _einsum(f, "outer") if isinstance(f, fx.Node) else None
        if pair is None and _is(f, MATMUL, "matmul"):
            k, e = _unsqueezed(f.args[0], -1), _unsqueezed(f.args[1], -2)
            pair = (k, e) if k is not None and e is not None else None
        if pair is not None:
            return pair[0], pair[1], [g for g in factors if g is not f]
    col = [f for f in factors if _unsqueezed(f, -1) is not None]
    row = [f for f in factors if _unsqueezed(f, -2) is not None]
    if len(col) == 1 and len(row) == 1:
        return _unsqueezed(col[0], -1), _unsqueezed(row[0], -2), [f for f in factors if f is not col[0] and f is not row[0]]
    return None


def _carry_free(node, carry: fx.Node) -> bool:
    return not isinstance(node, fx.Node) or carry not in _ancestors(node)


def match_delta_step(traced: fx.GraphModule) -> DeltaStep | None:
    """The delta-rule parts of a traced step (placeholders: carry, index, *tensors; outputs: new
    carry, one per-step output), or None when the step is not written as one."""
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    out = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    if not placeholders or not isinstance(out, (tuple, list)) or len(out) != 2:
        return None
    S, (new, y) = placeholders[0], out
    if not _is(new, ADD, "add") or len(new.args) != 2 or new.kwargs:
        return None
    for S1, U in (new.args, new.args[::-1]):
        a = None
        if S1 is not S:
            if not (_is(S1, MUL, "mul") and S in S1.args[:2]):
                continue
            a = S1.args[1] if S1.args[0] is S else S1.args[0]
            if not _carry_free(a, S):
                continue
        parts = _outer_parts(_factors(U))
        if parts is None:
            continue
        k_outer, e_outer, rest = parts
        k_factors, e_factors = _factors(k_outer), _factors(e_outer)
        for d in e_factors:
            if not (_is(d, SUB, "sub") and len(d.args) == 2 and not d.kwargs):  # sub(x, y, alpha=2) is not x - y
                continue
            v, r = d.args
            k = _readout(r, S1)
            if k is None or not any(k is f for f in k_factors):
                continue
            # beta's factors, each with the side it multiplies: the update (a state-shaped value), the
            # key before its unsqueeze(-1) (shaped like k) or the error before its unsqueeze(-2) (like v)
            beta = [(f, "state") for f in rest] + [(f, "key") for f in k_factors if f is not k] + \
                [(f, "value") for f in e_factors if f is not d]
            q = _readout(y, new)
            if q is None or not all(_carry_free(x, S) and _carry_free(x, new) for x in (k, v, q, *(f for f, _ in beta))) \
                    or not isinstance(v, fx.Node) or (a is not None and not isinstance(a, fx.Node)):
                return None
            graph = lambda n: _subgraph(traced, n, drop=1) if isinstance(n, fx.Node) else n  # noqa: E731
            return DeltaStep(graph(a) if a is not None else None, graph(k), graph(v), graph(q),
                             [(graph(f), side) for f, side in beta])
    return None


__all__ = ["DeltaStep", "match_delta_step"]
