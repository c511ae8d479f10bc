"""Recognise a matrix-state loop in a lifted loop body, so it runs as the chunked matrix scan.

A loop S = a * S + k v^T with the output o = S^T q (linear attention, RetNet, GLA, Mamba-2) is
affine in S, so the generic lifting already runs it as a first-order scan, but that holds all T
states [T, ..., dk, dv]. When the body's update is an outer product and the output reads the
new state only through that contraction, the chunked form (backends/scans/matrix/dispatch.py) computes
the outputs with matmuls per chunk and never holds more than one state per chunk.

Recognised, structurally (other spellings keep the generic path, which is exact too):
  outer product b:  k.unsqueeze(-1) * v.unsqueeze(-2), k[..., None] * v[..., None, :],
                    k.unsqueeze(-1) @ v.unsqueeze(-2), torch.einsum("...k,...v->...kv", k, v)
  readout y:        torch.einsum("...kv,...k->...v", S, q) (either operand order),
                    (S * q.unsqueeze(-1)).sum(-2), (q.unsqueeze(-2) @ S).squeeze(-2)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from wavefront.time_loops.affine_carry import _ancestors

MUL = (operator.mul, torch.mul)
MATMUL = (operator.matmul, torch.matmul)


@dataclass
class MatrixStep:
    """The parts of S_t = a_t S_{t-1} + k_t v_t^T, y_t = S_t^T q_t as graphs of (index, *tensors)."""

    k: fx.GraphModule
    v: fx.GraphModule
    q: fx.GraphModule


def _is(node, targets, method: str) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in targets) or (node.op == "call_method" and node.target == method))


def _arg(node: fx.Node, pos: int, name: str, default=None):
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


def _unsqueezed(node, dim: int):
    """x when node is x with a new axis at `dim` (-1 or -2), else None."""
    if not isinstance(node, fx.Node):
        return None
    if _is(node, (torch.unsqueeze,), "unsqueeze"):
        return node.args[0] if _arg(node, 1, "dim") == dim else None
    if node.op == "call_function" and node.target is operator.getitem:
        key = node.args[1]
        want = (Ellipsis, None) if dim == -1 else (Ellipsis, None, slice(None))
        return node.args[0] if isinstance(key, tuple) and key == want else None
    return None


def _einsum(node, shape: str):
    """The operands of an einsum whose equation has this shape: 'outer' (Pk,Pv->Pkv) or
    'readout' (Pkv,Pk->Pv, or Pk,Pkv->Pv), put in the order (k, v) resp. (S, q); else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.einsum):
        return None
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "->" not in eq or len(ops) != 2:
        return None
    lhs, rhs = eq.replace(" ", "").split("->")
    x, y = lhs.split(",") if lhs.count(",") == 1 else ("", "")
    if not (x and y and rhs):
        return None
    if shape == "outer":
        ok = x[:-1] == y[:-1] == rhs[:-2] and rhs[-2:] == x[-1] + y[-1] and x[-1] != y[-1] and x[-1] not in x[:-1]
        return tuple(ops) if ok and y[-1] not in y[:-1] else None
    for s, q, (S, Q) in ((x, y, ops), (y, x, ops[::-1])):
        if len(s) >= 2 and s[:-2] == q[:-1] == rhs[:-1] and s[-2] == q[-1] and s[-1] == rhs[-1] and s[-2] != s[-1]:
            return S, Q
    return None


def _outer(node):
    """(k, v) when node is an outer product of their last dims, else None."""
    found = _einsum(node, "outer")
    if found:
        return found
    if _is(node, MUL, "mul") or _is(node, MATMUL, "matmul"):
        x, y = node.args[0], node.args[1]
        for a, b in ((x, y), (y, x)) if _is(node, MUL, "mul") else ((x, y),):
            k, v = _unsqueezed(a, -1), _unsqueezed(b, -2)
            if k is not None and v is not None:
                return k, v
    return None


def _readout(node, state: fx.Node):
    """q when node is S^T q for S = `state`, else None."""
    found = _einsum(node, "readout")
    if found:
        return found[1] if found[0] is state else None
    if _is(node, (torch.sum,), "sum") and _arg(node, 1, "dim") in (-2, (-2,), [-2]) \
            and not _arg(node, 2, "keepdim", False) and node.kwargs.get("dtype") is None:  # a dtype= rounds
        inner = node.args[0]
        if _is(inner, MUL, "mul"):
            x, y = inner.args[0], inner.args[1]
            for s, other in ((x, y), (y, x)):
                if s is state:
                    return _unsqueezed(other, -1)
    if _is(node, (torch.squeeze,), "squeeze") and _arg(node, 1, "dim") == -2:
        inner = node.args[0]
        if _is(inner, MATMUL, "matmul") and inner.args[1] is state:
            return _unsqueezed(inner.args[0], -2)
    return None


def _subgraph(gm: fx.GraphModule, node: fx.Node, drop: int = 0) -> fx.GraphModule:
    """A graph of gm's placeholders (after the first `drop`) computing `node`."""
    graph, env = fx.Graph(), {}
    keep = _ancestors(node)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if drop:
                drop -= 1
                continue
            env[n] = graph.node_copy(n)
        elif n in keep:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[node])
    out = fx.GraphModule(gm, graph)
    out.recompile()
    return out


def match_matrix_step(b: fx.GraphModule | None, ys: fx.GraphModule | None) -> MatrixStep | None:
    """The (k, v, q) graphs when `b` (of (index, *tensors)) is an outer product k v^T and `ys`
    (of (previous carry, new carry, index, *tensors)) is one readout S_new^T q; else None."""
    if b is None or ys is None:
        return None
    b_out = next(n for n in b.graph.nodes if n.op == "output").args[0]
    kv = _outer(b_out)
    placeholders = [n for n in ys.graph.nodes if n.op == "placeholder"]
    outs = next(n for n in ys.graph.nodes if n.op == "output").args[0]
    if kv is None or len(outs) != 1 or len(placeholders) < 2:
        return None
    previous, new = placeholders[:2]
    q = _readout(outs[0], new)
    if q is None or previous in _ancestors(q) or new in _ancestors(q):
        return None
    k, v = kv
    if not all(isinstance(x, fx.Node) for x in (k, v, q)):
        return None
    return MatrixStep(_subgraph(b, k), _subgraph(b, v), _subgraph(ys, q, drop=2))
