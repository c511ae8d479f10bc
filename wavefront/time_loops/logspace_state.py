"""Recognise a running-max stabilised loop (RWKV-4's WKV written as a loop) as an affine
recurrence in log space, so it runs as the stabilised chunked scan.

A loop with three carries (num, den, m) in which num and den stand for N = num e^m, D = den e^m is
affine in (N, D) when, whatever the maxima pick,
    N' = e^{lw} N + e^{lk} x,   D' = e^{lw} D + e^{lk},   m' = max(m + lw, lk)
with lw (the log decay), lk and x free of the carries, and its output reads
    y = (N + e^{lb} x) / (D + e^{lb})         (the bonus lb = lu + lk, lu free of the steps).
That is proved here symbolically: the traced step is evaluated with sympy (carries and per-step
reads as real symbols; + - * / exp max and dtype conversions only), each max replaced by each of
its arguments in turn, and in every case the represented values are simplified and compared
with that form; the maxima must drop out (they only choose a scale). The coefficients come out
as sympy expressions of the reads and are evaluated with torch ops. Why sympy: deciding that two
spellings of exp/max algebra are the same function is symbolic algebra, which sympy does well.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import sympy
import torch
from torch import fx

_ADD = {operator.add, torch.add}
_SUB = {operator.sub, torch.sub}
_MUL = {operator.mul, torch.mul}
_DIV = {operator.truediv, torch.div}
_NEG = {operator.neg, torch.neg}
_EXP = {torch.exp}
_MAX = {torch.maximum, torch.max}
_METHODS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
            "neg": operator.neg, "exp": torch.exp, "maximum": torch.maximum}
_CONVERSIONS = {"to", "type", "float", "double", "half", "bfloat16", "contiguous", "clone"}
_LAYOUT = {"contiguous", "clone"}  # the same values: identity wherever they are


@dataclass
class LogSpaceStep:
    """A stabilised triple loop, as sympy expressions of the per-step reads: the carries' roles
    (positions of num, den, max), the log decay lw, the input's log weight lk, its value x, the
    bonus lu, and `reads`: symbol -> the FX node of the traced step it stands for."""

    num: int
    den: int
    max: int
    lw: sympy.Expr
    lk: sympy.Expr
    x: sympy.Expr
    lu: sympy.Expr
    reads: dict


class _NotLogSpace(Exception):
    """The step is not a stabilised pair (why, for debugging; the caller reports its own reason)."""


def _symbolic(traced: fx.GraphModule, n_carries: int):
    """The step's outputs as sympy expressions: the carries are c0.., every value the algebra does
    not look into (a placeholder, a parameter, an indexed read, any other op on carry-free
    values) is a real symbol of its own, recorded in `reads` with its node."""
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    carries = placeholders[:n_carries]
    outputs = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    output_value = outputs[-1] if isinstance(outputs, (tuple, list)) and len(outputs) > n_carries else None
    env = {n: sympy.Symbol(f"c{k}", real=True) for k, n in enumerate(carries)}
    reads: dict = {}
    depends = set(carries)

    def leaf(n):
        sym = sympy.Symbol(f"r{len(reads)}", real=True)
        reads[sym] = n
        return sym

    def value(a):
        if isinstance(a, fx.Node):
            return env[a]
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return sympy.Integer(int(a)) if float(a).is_integer() else sympy.Float(a)
        raise _NotLogSpace(f"a constant {a!r}")

    for n in traced.graph.nodes:
        if n in env or n.op == "output":
            continue
        if any(d in depends for d in n.all_input_nodes):
            depends.add(n)
        fn = _METHODS.get(n.target, n.target) if n.op == "call_method" else n.target
        args = n.args
        try:
            if n.op in ("placeholder", "get_attr"):
                env[n] = leaf(n)
            elif n.op == "call_method" and n.target in _LAYOUT:
                env[n] = value(args[0])
            elif n.op == "call_method" and n.target in _CONVERSIONS and n not in depends:
                env[n] = leaf(n)  # a converted read: evaluated with its conversion, an opaque value here
            elif n.op == "call_method" and n.target in _CONVERSIONS and n is output_value:
                env[n] = value(args[0])  # the written value's last cast: the write into the output casts alike
            elif n.op == "call_method" and n.target in _CONVERSIONS:
                raise _NotLogSpace(f"a dtype conversion (`{n.target}`) of a value the carries reach (it may round)")
            elif fn in _ADD | _SUB | _MUL | _DIV and len(args) == 2 and not n.kwargs:
                a, b = value(args[0]), value(args[1])
                env[n] = a + b if fn in _ADD else a - b if fn in _SUB else a * b if fn in _MUL else a / b
            elif fn in _NEG and len(args) == 1:
                env[n] = -value(args[0])
            elif fn in _EXP and len(args) == 1:
                env[n] = sympy.exp(value(args[0]))
            elif fn in _MAX and len(args) == 2 and not n.kwargs:
                env[n] = sympy.Max(value(args[0]), value(args[1]))
            elif n not in depends:
                env[n] = leaf(n)
            else:
                raise _NotLogSpace(f"`{getattr(fn, '__name__', fn)}` on a carry")
        except KeyError as e:  # an argument the algebra could not express (e.g. a tuple)
            if n in depends:
                raise _NotLogSpace("an unsupported argument") from e
            env[n] = leaf(n)
    return env, reads, value


def _cases(exprs):
    """The expressions with each max replaced by each of its arguments, in every combination."""
    maxes = sorted({m for e in exprs for m in e.atoms(sympy.Max)}, key=sympy.default_sort_key)
    if len(maxes) > 4:
        raise _NotLogSpace(f"{len(maxes)} maxima")
    for pick in itertools.product(*(m.args for m in maxes)):
        sub = dict(zip(maxes, pick))
        yield [e.xreplace(sub) for e in exprs]


def _same(a, b) -> bool:
    return sympy.simplify(sympy.powsimp(sympy.expand(a - b), force=True)) == 0


def _linear_part(expr, var, others, scale=1):
    """(coefficient / scale, rest) when expr = coefficient * var + rest, with coefficient / scale
    and rest free of var and of the others."""
    expr = sympy.powsimp(sympy.expand(expr), force=True)
    coeff = sympy.simplify(sympy.powsimp(sympy.expand(sympy.diff(expr, var) / scale), force=True))
    rest = sympy.simplify(sympy.powsimp(sympy.expand(expr - coeff * scale * var), force=True))
    if (coeff.free_symbols | rest.free_symbols) & ({var} | set(others)):
        raise _NotLogSpace("not affine in the represented values")
    return coeff, rest


def match_logspace_step(traced: fx.GraphModule, n_carries: int) -> LogSpaceStep | None:
    """The WKV parts of a traced step (placeholders: the carries, index, *tensors; outputs: the
    new carries, then one per-step output), or None when it is not such a loop."""
    if n_carries != 3:
        return None
    out = next(n for n in traced.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        return None
    try:
        env, reads, value = _symbolic(traced, n_carries)
        new = [value(o) for o in out[:3]]
        y = value(out[3])
        c = [sympy.Symbol(f"c{k}", real=True) for k in range(3)]
        for mi in range(3):
            found = _match(new, y, c, mi)
            if found is not None:
                ni, di, lw, lk, x, lu = found
                return LogSpaceStep(ni, di, mi, lw, lk, x, lu, reads)
    except _NotLogSpace:
        return None
    return None


def _match(new, y, c, mi):
    """(num, den, lw, lk, x, lu) when carry `mi` is the max of a stabilised pair, else None."""
    others = [k for k in range(3) if k != mi]
    m = c[mi]
    N, D = sympy.Symbol("N", real=True), sympy.Symbol("D", real=True)
    found = None
    for case in _cases([*new, y]):
        m_new, y_case = case[mi], case[3]
        parts = []
        for k in others:  # the represented value c_k e^m, after the step
            represented = case[k] * sympy.exp(m_new)
            parts.append(_linear_part(represented, c[k], c, scale=sympy.exp(m)))
        (a0, b0), (a1, b1) = parts
        if not _same(a0, a1):
            return None
        # which carry is the denominator: its input is e^{lk}, the numerator's e^{lk} x
        for (ni, bn), (di, bd) in (((others[0], b0), (others[1], b1)), ((others[1], b1), (others[0], b0))):
            x = sympy.simplify(bn / bd)
            if x.free_symbols & set(c):
                continue
            lk = sympy.simplify(sympy.expand_log(sympy.log(bd), force=True))
            lw = sympy.simplify(sympy.expand_log(sympy.log(a0), force=True))
            if not _stabiliser_is(new[mi], m + lw, lk):
                continue
            yr = sympy.simplify(y_case.xreplace({c[ni]: N * sympy.exp(-m), c[di]: D * sympy.exp(-m)}))
            num, den = sympy.fraction(sympy.together(yr))
            cn, rn = _linear_part(num, N, [D, m, *c])
            cd, rd = _linear_part(den, D, [N, m, *c])
            if not _same(cn, cd) or not _same(rn, x * rd):
                continue
            lu = sympy.expand_log(sympy.simplify(sympy.log(sympy.simplify(rd / cd))), force=True) - lk
            lu = sympy.simplify(lu)
            if any(e.atoms(sympy.log) or e.has(sympy.I) for e in (lw, lk, lu)):
                return None  # a weight that is not an exponential (it could be negative): no log space
            got = (ni, di, lw, lk, x, lu)
            if found is None:
                found = got
            elif not all(_same(p, q) for p, q in zip(found[2:], got[2:])) or found[:2] != got[:2]:
                return None  # the maxima change what the step computes: not a stabiliser
            break
        else:
            return None
    return found


def _stabiliser_is(m_new, decayed, incoming) -> bool:
    """The new max is max(m + lw, lk), the convention the chunked kernel keeps and returns."""
    if not isinstance(m_new, sympy.Max) or len(m_new.args) != 2:
        return False
    a, b = m_new.args
    return (_same(a, decayed) and _same(b, incoming)) or (_same(a, incoming) and _same(b, decayed))


def evaluate(expr: sympy.Expr, values: dict) -> torch.Tensor:
    """A sympy expression of the read symbols as torch ops on their tensors."""
    if expr in values:
        return values[expr]
    if expr.is_Number:
        return float(expr)
    if isinstance(expr, sympy.Add):
        out = evaluate(expr.args[0], values)
        for a in expr.args[1:]:
            out = out + evaluate(a, values)
        return out
    if isinstance(expr, sympy.Mul):
        out = evaluate(expr.args[0], values)
        for a in expr.args[1:]:
            out = out * evaluate(a, values)
        return out
    if isinstance(expr, sympy.Pow) and expr.exp.is_Integer:
        base = evaluate(expr.base, values)
        return base ** int(expr.exp) if int(expr.exp) > 0 else 1.0 / base ** (-int(expr.exp))
    if isinstance(expr, sympy.exp):
        return torch.exp(torch.as_tensor(evaluate(expr.args[0], values)))
    if isinstance(expr, sympy.log):
        return torch.log(torch.as_tensor(evaluate(expr.args[0], values)))
    raise ValueError(f"cannot evaluate {expr}")


__all__ = ["LogSpaceStep", "evaluate", "match_logspace_step"]
