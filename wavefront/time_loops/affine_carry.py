"""Is a recurrence step affine in its carry? If so, extract a(x) and b(x).

A step new = f(carry, x) can run as a scan iff new = a(x) * carry + b(x) elementwise (ARCHITECTURE.md,
"The two recurrences"). Tracing f with torch.fx and propagating, for every node, whether it is
independent of the carry or affine in it (value = alpha * carry + beta, alpha and beta carry-free)
decides that exactly, op by op, without running anything; building alpha and beta as FX nodes
along the way yields a(x) and b(x) as graphs. A carry that reaches a non-affine op (tanh, a
product of two carry-dependent values, a matmul with the carry) is reported with the op and the
line, and the loop is left as it is.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

_aten = torch.ops.aten
_ADD = {operator.add, torch.add, _aten.add.Tensor}
_SUB = {operator.sub, torch.sub, _aten.sub.Tensor}
_MUL = {operator.mul, torch.mul, _aten.mul.Tensor, _aten.mul.Scalar}
_DIV = {operator.truediv, torch.div, _aten.div.Tensor, _aten.div.Scalar}
_NEG = {operator.neg, torch.neg, _aten.neg.default}
# Tensor methods that are the same arithmetic as the functions above.
_METHODS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv, "neg": operator.neg}
# Conversions that do not change the value's math (dtype, device, layout): alpha and beta pass
# through; the scan then runs in the dtype the new carry is converted to (AffineStep.dtype), else in
# the promoted dtype of its coefficients and carry. A carry converted to a stated dtype other than
# the one the new carry ends in (`(a * h).to(torch.bfloat16).to(x.dtype)`) is rounded inside the
# step, which a scan would not reproduce: not taken.
_CONVERSIONS = {"to", "type", "float", "double", "contiguous", "clone"}


class NotAffine(Exception):
    """The carry enters the step non-affinely; `node` is the first such op."""

    def __init__(self, reason: str, node: fx.Node | None = None):
        super().__init__(reason)
        self.reason, self.node = reason, node


@dataclass
class AffineStep:
    """new_carry = a(x) * carry + b(x), with a and b traced graphs of the step's other inputs
    (x, or several) alone; a None means 1, b None means 0."""

    a: fx.GraphModule | None
    b: fx.GraphModule | None
    traced: fx.GraphModule
    ab: fx.GraphModule | None = None  # (a, b) from one graph, sharing what both compute; None if either is None
    dtype: torch.dtype | None = None  # the dtype the step converts its new carry to (`h.to(torch.float32)`), if any


_TO_DTYPE = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}


VALUE_META = "wavefront_value"  # node.meta key: the value's dtype and shape when the step ran once


def value_dtype(node) -> torch.dtype | None:
    """The dtype a traced node's value had when the step ran once on real inputs (the runner
    records it), None when not recorded."""
    meta = node.meta.get(VALUE_META) if isinstance(node, fx.Node) else None
    return getattr(meta, "dtype", None)


def _precision(dtype: torch.dtype) -> float:
    """The rounding step of a dtype (complex: of its parts); 0 for integers (exact)."""
    if dtype.is_complex:
        dtype = torch.float32 if dtype == torch.complex64 else torch.float64
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def declared_dtype(node) -> torch.dtype | None:
    """The dtype a value is converted to last (`x.to(torch.float32)`, `.to(dtype=...)`, `.float()`),
    looking through layout-only methods; None when it is not converted to a stated dtype.

    >>> g = fx.symbolic_trace(lambda h: (h * 2).to(dtype=torch.float32).contiguous())
    >>> declared_dtype(next(n for n in g.graph.nodes if n.op == "output").args[0])
    torch.float32
    """
    while isinstance(node, fx.Node) and node.op == "call_method":
        if node.target in _TO_DTYPE:
            return _TO_DTYPE[node.target]
        if node.target in ("to", "type"):
            stated = [a for a in (*node.args[1:], node.kwargs.get("dtype")) if isinstance(a, torch.dtype)]
            return stated[0] if stated else None
        if node.target not in ("contiguous", "clone"):
            return None
        node = node.args[0]
    return None


def _where(node: fx.Node) -> str:
    """`op(args)` and, when the trace recorded it, the source line: what a user can find."""
    args = ", ".join(str(a) for a in node.args)
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    call = f"{node.args[0]}.{target}({args.split(', ', 1)[1] if ', ' in args else ''})" \
        if node.op == "call_method" else f"{target}({args})"
    lines = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines() if ln.strip()]
    frames = [(f, c) for f, c in zip(lines, lines[1:] + [""])
              if f.startswith("File ") and "/torch/" not in f and not c.startswith("File ")]
    loc = f" ({frames[-1][0][5:].split(', in ')[0]}: {frames[-1][1]})" if frames else ""
    return f"`{call}`{loc}"


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = {node}, [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def analyse_step(step: nn.Module | object) -> AffineStep:
    """Decide whether `step(carry, x, ...) -> new_carry` is affine in carry and extract a(x), b(x).
    `step` is a module or function (traced here) or an already traced GraphModule, e.g. the
    combine graph of torch's scan (outputs [new_carry, ys...]: the first is the carry).

    >>> step = lambda h, x: torch.sigmoid(x) * h + (1 - torch.sigmoid(x)) * x
    >>> s = analyse_step(step)
    >>> x, h = torch.randn(4), torch.randn(4)
    >>> torch.allclose(s.a(x) * h + s.b(x), step(h, x))
    True
    """
    traced = step if isinstance(step, fx.GraphModule) else fx.symbolic_trace(step)
    g = traced.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    if len(placeholders) < 2:
        raise TypeError(f"a step takes (carry, x, ...), got {len(placeholders)} inputs")
    carry, inputs = placeholders[0], placeholders[1:]
    out_node = next(n for n in g.nodes if n.op == "output")
    new = out_node.args[0]
    if isinstance(new, (list, tuple)):  # scan's combine graph: [new_carry, ys...]
        new = new[0]
    if not isinstance(new, fx.Node):
        raise TypeError("a step returns the new carry (one tensor) first")

    # Build a(x) and b(x) in a fresh graph as we go: every carry-free node is copied there;
    # every carry-dependent node v gets alpha[v], beta[v] (None means 1 resp. 0).
    ag = fx.Graph()
    free: dict[fx.Node, fx.Node] = {x: ag.placeholder(x.name) for x in inputs}
    alpha: dict[fx.Node, fx.Node | None] = {carry: None}
    beta: dict[fx.Node, fx.Node | None] = {carry: None}

    def dep(v):
        return isinstance(v, fx.Node) and v in alpha

    def val(v):
        return free[v] if isinstance(v, fx.Node) else v

    def add(u, v, sub=False):
        if u is None:
            return ag.call_function(operator.neg, (v,)) if (sub and v is not None) else v
        if v is None:
            return u
        return ag.call_function(operator.sub if sub else operator.add, (u, v))

    def scale(u, k, div=False):  # u * k (u None means 1)
        if u is None:
            return ag.call_function(operator.truediv, (1.0, k)) if div else k
        return ag.call_function(operator.truediv if div else operator.mul, (u, k))

    needed = _ancestors(new)  # ys computed from the carry (scan outputs) need not be affine
    conversions: dict = {}  # stated dtype -> the first conversion of a carry-dependent value to it
    narrowed: list = []  # conversions of carry-dependent values to a less precise dtype (dtypes recorded)
    for n in g.nodes:
        if n.op in ("placeholder", "output") or n not in needed:
            continue
        ins = [a for a in n.all_input_nodes]
        if not any(dep(a) for a in ins):
            free[n] = ag.node_copy(n, lambda a: free[a])
            continue
        fn = n.target if n.op == "call_function" else _METHODS.get(n.target) if n.op == "call_method" else None
        args = n.args
        if n.op == "call_method" and n.target in _CONVERSIONS and dep(args[0]) \
                and not any(dep(a) for a in args[1:]) and not any(dep(a) for a in n.kwargs.values()):
            alpha[n], beta[n] = alpha[args[0]], beta[args[0]]
            src, dst = value_dtype(args[0]), value_dtype(n)
            if src is not None and dst is not None:
                if _precision(dst) > _precision(src):  # rounds: judged against the carry's own dtype below
                    narrowed.append(n)
            elif n.target not in ("contiguous", "clone") and declared_dtype(n) is not None:
                conversions.setdefault(declared_dtype(n), n)
            continue
        if fn in _ADD | _SUB and len(args) == 2 and n.kwargs.get("alpha", 1) == 1:
            u, v = args
            sub = fn in _SUB
            au, bu = (alpha[u], beta[u]) if dep(u) else (0, val(u))
            av, bv = (alpha[v], beta[v]) if dep(v) else (0, val(v))
            if au == 0:  # free (+/-) dependent
                alpha[n] = ag.call_function(operator.neg, (av,)) if sub and av is not None else (
                    ag.call_function(operator.neg, (1.0,)) if sub else av)
                beta[n] = add(bu, bv, sub)
            elif av == 0:
                alpha[n], beta[n] = au, add(bu, bv, sub)
            else:
                alpha[n] = add(au if au is not None else 1.0, av if av is not None else 1.0, sub)
                beta[n] = add(bu, bv, sub)
            continue
        if fn in _MUL | _DIV and len(args) == 2 and not n.kwargs:
            u, v = args
            if dep(u) and dep(v):
                raise NotAffine(f"the carry is multiplied by itself at {_where(n)}", n)
            if fn in _DIV and dep(v):
                raise NotAffine(f"the carry is in a denominator at {_where(n)}", n)
            d, k = (u, v) if dep(u) else (v, u)
            k = val(k)
            alpha[n] = scale(alpha[d], k, fn in _DIV)
            beta[n] = scale(beta[d], k, fn in _DIV) if beta[d] is not None else None
            continue
        if fn in _NEG and len(args) == 1:
            (u,) = args
            alpha[n] = ag.call_function(operator.neg, (alpha[u] if alpha[u] is not None else 1.0,))
            beta[n] = ag.call_function(operator.neg, (beta[u],)) if beta[u] is not None else None
            continue
        op = n.target if n.op != "call_module" else type(traced.get_submodule(n.target)).__name__
        name = getattr(op, "__name__", str(op))
        raise NotAffine(f"the carry enters `{name}` at {_where(n)}: not affine, so not scan-parallelizable", n)

    if not dep(new):
        raise NotAffine("the new carry does not depend on the carry (no recurrence)")
    final = value_dtype(new) or declared_dtype(new)
    last_casts = set()  # the conversions that end the step in the new carry's dtype (or keep the value's)
    node = new
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in _CONVERSIONS:
        dtype = value_dtype(node) or declared_dtype(node)
        if dtype is not None and dtype != final:
            break
        last_casts.add(node)
        node = node.args[0]
    # a rounding to the carry's own dtype (or finer) is at the precision the scan keeps it in; a coarser
    # one inside the step (`.to(torch.float16)` of a float32 carry's value) is not
    coarse = _precision(final) if final is not None else 0.0
    rounded = [(value_dtype(c), c) for c in narrowed if c not in last_casts and _precision(value_dtype(c)) > coarse]
    rounded += [(d, c) for d, c in conversions.items() if d != final and c not in last_casts]
    if rounded:  # a rounding inside the step that a scan in one dtype would not reproduce
        d, c = rounded[0]
        raise NotAffine(f"the carry is converted to {d} at {_where(c)} but the new carry is not kept in it: "
                        "a scan would not round alike", c)

    def graph_of(*values):
        if any(v is None for v in values):
            return None
        h = fx.Graph()
        m = {}
        for node in ag.nodes:
            m[node] = h.node_copy(node, lambda a: m[a])
        outs = [m[v] if isinstance(v, fx.Node) else v for v in values]
        h.output(outs[0] if len(outs) == 1 else tuple(outs))
        gm = fx.GraphModule(traced, h)
        gm.graph.eliminate_dead_code()  # needs the owning module to judge call_module purity
        gm.recompile()
        return gm

    return AffineStep(graph_of(alpha[new]), graph_of(beta[new]), traced, graph_of(alpha[new], beta[new]),
                      declared_dtype(new))


def scalar_constant(gm) -> int | float | complex | None:
    """The Python number a coefficient graph returns whatever its inputs (`h = 0.9 * h + x[t]`:
    a = 0.9), else None. vmap cannot map such a graph: it returns no tensor."""
    if not isinstance(gm, fx.GraphModule):
        return None
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    return out if isinstance(out, (int, float, complex)) and not isinstance(out, bool) else None


def constant_coefficients(A, B, ca, cb, h0: torch.Tensor, T: int, dtype: torch.dtype | None = None):
    """A and B with the constant ones (ca, cb: Python numbers, or None) made [T, 1, ...] tensors
    of the dtype the loop computes in (`dtype` when known): a Python number takes the tensors'
    dtype (`0.9 * h` of a float32 h stays float32), widening only across kinds (a complex number
    and a real carry).

    >>> A, B = constant_coefficients(None, None, 0.5, None, torch.zeros(2, dtype=torch.float32), 3)
    >>> A.shape, A.dtype, B
    (torch.Size([3, 1]), torch.float32, None)
    """
    if dtype is None:  # else: the dtype the loop keeps its carry in (a constant is a Python float until then)
        dtype = h0.dtype
        for x in (A, B):
            if x is not None:
                dtype = torch.promote_types(dtype, x.dtype)
    like, shape = torch.empty((), dtype=dtype), (T,) + (1,) * h0.dim()  # [T, 1, ...]: broadcasts over the carry
    if ca is not None:
        A = torch.full(shape, ca, dtype=torch.result_type(like, ca), device=h0.device)
    if cb is not None:
        B = torch.full(shape, cb, dtype=torch.result_type(like, cb), device=h0.device)
    return A, B


def broadcast_coefficients(A, B, h0: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B ([T, ...] or None for 1 and 0) expanded to [T, *shape], the carry's shape
    broadcast with theirs."""
    inner = torch.broadcast_shapes(h0.shape, *[x.shape[1:] for x in (A, B) if x is not None])
    shape = (T, *inner)
    A = A.expand(shape) if A is not None else h0.new_ones(shape)
    B = B.expand(shape) if B is not None else h0.new_zeros(shape)
    return A, B
