"""Find Python time loops in a function's source and rewrite the function to hand them to a runner.

torch.fx cannot trace `for t in range(x.shape[1])` (the length is a tensor's), and unrolling it
(torch.export, dynamo) makes the graph grow with T. So the loop is found in the source instead:
a `for <i> in range(...)` (or `reversed(range(...))`) whose body is straight-line code of
  - assignments to names: a name read before it is assigned in the body is the carry,
    the others are temporaries;
  - output writes `out[:, i] = value` (only `:` besides the index) or `outs.append(value)`.
A list that is only ever stacked after the loop (`outs = []` before it, `torch.stack(outs, d)`
after, no other mention: deferred_stacks) is never filled: the stack takes the scan's outputs.
The rewritten function asks a runner for the loop's result first and runs the original loop,
unchanged, when the runner declines (returns None): a loop that cannot be proved affine, an
empty range, an unexpected value. Why we parse source by hand: no library lifts a Python loop
over a data-dependent length into a scan without unrolling it.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import types
from dataclasses import dataclass, field

import torch

RUNNER = "__wavefront_loop__"


@dataclass
class LoopOutput:
    """One per-iteration output: `container[:, i] = value` (kind 'write', index at `position`)
    or `container.append(value)` (kind 'append')."""

    kind: str
    container: str
    position: int = 0
    stacked: str = ""  # appends only: the name the runner binds to the stacked outputs, when the list is
    # only ever stacked after the loop (deferred_stacks); the list itself then stays empty


@dataclass
class LoopSite:
    """A `for` loop over a range in some function, and whether it can be handed to a runner."""

    qualname: str
    lineno: int
    filename: str = ""
    index: str = ""
    carries: list[str] = field(default_factory=list)
    temps: list[str] = field(default_factory=list)
    free: list[str] = field(default_factory=list)  # names the body reads from the function's locals
    outputs: list[LoopOutput] = field(default_factory=list)
    body: list[ast.stmt] = field(default_factory=list)  # outputs rewritten to `__wf_y<k> = value`
    reason: str = ""  # why it cannot be lifted ('' if it can)

    @property
    def liftable(self) -> bool:
        return not self.reason

    def where(self) -> str:
        return f"{self.qualname} line {self.lineno}"


def _names(node: ast.AST, ctx) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)]


_METADATA = frozenset({"dtype", "device", "shape", "ndim", "layout", "is_cuda", "size", "dim"})


def _value_reads(node: ast.AST) -> set[str]:
    """The names whose values `node` reads: `out.dtype`, `out.shape`, `out.size(1)` read only what
    every iteration sees alike, not what an earlier one wrote."""
    meta = {id(n.value) for n in ast.walk(node) if isinstance(n, ast.Attribute) and n.attr in _METADATA}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and id(n) not in meta}


def _local_names(fn_def: ast.FunctionDef) -> set[str]:
    a = fn_def.args
    args = [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else []), *([a.kwarg] if a.kwarg else [])]
    return {x.arg for x in args} | set(_names(fn_def, ast.Store))


def _range_of(it: ast.expr) -> tuple[ast.expr, bool] | None:
    """(the range call, reversed?) for `range(...)` / `reversed(range(...))`, else None."""
    def is_call(e, name):
        return isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == name and not e.keywords
    if is_call(it, "range"):
        return it, False
    if is_call(it, "reversed") and len(it.args) == 1 and is_call(it.args[0], "range"):
        return it.args[0], True
    return None


def _output(stmt: ast.stmt, index: str) -> tuple[LoopOutput, ast.expr] | str | None:
    """An output statement as (output, value); a reason string if it looks like one but is not
    supported; None if it is not an output statement."""
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        c = stmt.value
        if isinstance(c.func, ast.Attribute) and c.func.attr == "append" and isinstance(c.func.value, ast.Name):
            if len(c.args) != 1 or c.keywords:
                return "an append with other than one value"
            return LoopOutput("append", c.func.value.id), c.args[0]
        return f"a call statement `{ast.unparse(stmt)}` (a side effect)"
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Subscript):
        tgt = stmt.targets[0]
        if not isinstance(tgt.value, ast.Name):
            return f"a write to `{ast.unparse(tgt)}`"
        parts = tgt.slice.elts if isinstance(tgt.slice, ast.Tuple) else [tgt.slice]
        pos = [k for k, p in enumerate(parts) if isinstance(p, ast.Name) and p.id == index]
        rest_ok = all(isinstance(p, ast.Slice) and p.lower is p.upper is p.step is None
                      for k, p in enumerate(parts) if k not in pos)
        if len(pos) != 1 or not rest_ok:
            return f"the write `{ast.unparse(tgt)}` (supported: the loop index once, `:` elsewhere)"
        return LoopOutput("write", tgt.value.id, pos[0]), stmt.value
    return None


def _analyse_loop(loop: ast.For, qualname: str, filename: str, fn_locals: set[str]) -> LoopSite:
    site = LoopSite(qualname, loop.lineno, filename)
    if not isinstance(loop.target, ast.Name):
        site.reason = "the loop target is not a single name"
        return site
    site.index = i = loop.target.id
    if loop.orelse:
        site.reason = "the loop has an else clause"
        return site
    stored: list[str] = []
    carries: list[str] = []
    containers: set[str] = set()
    body: list[ast.stmt] = []
    all_reads: list[str] = []
    for stmt in loop.body:
        out = _output(stmt, i)
        if isinstance(out, str):
            site.reason = f"its body has {out}"
            return site
        if out is not None:
            o, value = out
            site.outputs.append(o)
            containers.add(o.container)
            reads = _names(value, ast.Load)
            y = ast.Assign([ast.Name(f"__wf_y{len(site.outputs) - 1}", ast.Store())], value)
            body.append(ast.fix_missing_locations(ast.copy_location(y, stmt)))
        elif isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if not all(_names_only(n) for n in targets):
                site.reason = f"its body assigns to `{ast.unparse(stmt)}`"
                return site
            reads = _names(stmt.value, ast.Load) if stmt.value is not None else []
            if isinstance(stmt, ast.AugAssign):
                reads.append(stmt.target.id)
            body.append(stmt)
        else:
            site.reason = f"its body has a `{type(stmt).__name__}` statement at line {stmt.lineno} (straight-line code only)"
            return site
        all_reads.extend(reads)
        for r in reads:
            if r not in stored and r not in carries and r != i:
                carries.append(r)  # provisional: read before any store; kept if stored later
        for t in (targets if out is None else []):
            for name in _names(t, ast.Store):
                if name == i:
                    site.reason = "the body assigns the loop index"
                    return site
                if name not in stored:
                    stored.append(name)
    own = sorted(containers & set().union(*(_value_reads(stmt) for stmt in body)))
    if own:  # a value written in an earlier iteration is read back: a hidden carry
        site.reason = f"the body reads its own output `{own[0]}`"
        return site
    site.carries = [c for c in carries if c in stored]
    site.temps = [s for s in stored if s not in site.carries]
    site.free = [c for c in carries if c not in stored and c in fn_locals]
    site.body = body
    if not site.carries:
        site.reason = "no value is carried from one iteration to the next"
    return site  # several carries: the runner decides whether they are a form it runs


def _names_only(target: ast.expr) -> bool:
    """A name, or a (nested) tuple of names: `h, (C, n, m) = step(...)`."""
    if isinstance(target, ast.Name):
        return True
    return isinstance(target, (ast.Tuple, ast.List)) and all(_names_only(e) for e in target.elts)


def function_ast(fn) -> ast.FunctionDef | None:
    """`fn`'s definition, with line numbers of its source file (so that code compiled from it
    reports, and traces record, the user's own lines)."""
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    fdef = ast.parse(src).body[0]
    if not isinstance(fdef, ast.FunctionDef):
        return None
    ast.increment_lineno(fdef, fn.__code__.co_firstlineno - 1)
    return fdef


def has_source(fn) -> bool:
    """Can `fn`'s definition be read (and so its loops found)?

    >>> has_source(has_source)
    True
    """
    return function_ast(fn) is not None


def find_time_loops(fn) -> list[LoopSite]:
    """Every `for ... in range(...)` loop in `fn`'s source, each with what a runner needs or why
    it cannot be lifted.

    >>> def f(x):
    ...     h = x[0] * 0
    ...     for t in range(x.shape[0]):
    ...         h = 0.5 * h + x[t]
    ...     return h
    >>> [(s.carries, s.free, s.liftable) for s in find_time_loops(f)]
    [(['h'], ['x'], True)]
    """
    if "range" not in getattr(getattr(fn, "__code__", None), "co_names", ()):
        return []
    fdef = function_ast(fn)
    if fdef is None:
        return []
    fn_locals = _local_names(fdef)
    sites = []
    for node in ast.walk(fdef):
        if isinstance(node, ast.For) and _range_of(node.iter) is not None:
            sites.append(_analyse_loop(node, fn.__qualname__, fn.__code__.co_filename, fn_locals))
    return sites


STACK = "stacked"  # the runner's method that stands in for `torch.stack(outs, dim)` after a lifted loop


def _is_torch_stack(node: ast.AST, container: str) -> bool:
    """`torch.stack(<container>)`, `torch.stack(<container>, d)` or `torch.stack(<container>, dim=d)`."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "stack"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch" and len(node.args) in (1, 2)
            and isinstance(node.args[0], ast.Name) and node.args[0].id == container
            and all(k.arg == "dim" for k in node.keywords) and len(node.args) + len(node.keywords) <= 2)


def _blocks(fdef: ast.FunctionDef):
    """Every statement list in the function (bodies, else and finally clauses, handlers)."""
    for node in ast.walk(fdef):
        for name in ("body", "orelse", "finalbody"):
            block = getattr(node, name, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                yield block


def deferred_stacks(fdef: ast.FunctionDef, loop: ast.For, site: LoopSite) -> dict[int, list[ast.Call]]:
    """Per append output (its number in site.outputs) whose list is only ever stacked after the loop:
    the `torch.stack(outs, ...)` calls that can take the scan's stacked outputs directly.

    Proved from the source: in the statement list holding the loop, `outs = []` comes before it and
    every other mention of `outs` in the function is the loop's append or a `torch.stack(outs, ...)`
    in a later statement of that list. Then the list is never looked at, and the T tensors need not
    be made (nor stacked again).
    """
    block = next((b for b in _blocks(fdef) if any(stmt is loop for stmt in b)), None)
    if block is None:
        return {}
    at = next(i for i, stmt in enumerate(block) if stmt is loop)
    out = {}
    for j, o in enumerate(site.outputs):
        if o.kind != "append":
            continue
        c = o.container
        inits = [i for i, stmt in enumerate(block[:at]) if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                 and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id == c
                 and isinstance(stmt.value, ast.List) and not stmt.value.elts]
        if not inits:
            continue
        init = block[inits[-1]]
        stacks = [n for stmt in block[at + 1:] for n in ast.walk(stmt) if _is_torch_stack(n, c)]
        allowed = {id(init.targets[0])} | {id(n.args[0]) for n in stacks}
        allowed |= {id(n.func.value) for n in ast.walk(loop) if isinstance(n, ast.Call)
                    and isinstance(n.func, ast.Attribute) and n.func.attr == "append"
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == c}
        others = [n for n in ast.walk(fdef) if isinstance(n, ast.Name) and n.id == c and id(n) not in allowed]
        if stacks and not others:
            out[j] = stacks
    return out


class _ReplaceLoops(ast.NodeTransformer):
    """Turns liftable loop k into: r = runner(k, locals(), range bounds, reversed?); run the loop if r is None.
    A list only ever stacked after the loop gets the stacked scan outputs through runner.stacked()."""

    def __init__(self, liftable_lines: dict[int, int], sites: list[LoopSite]):
        self.liftable_lines = liftable_lines  # line in the source file -> site number
        self.sites = sites
        self.stack_calls: dict[int, str] = {}  # id of a torch.stack call -> the name holding its stacked outputs

    def visit_Call(self, node: ast.Call):
        self.generic_visit(node)
        name = self.stack_calls.get(id(node))
        if name is None:
            return node
        dim = node.args[1] if len(node.args) == 2 else (node.keywords[0].value if node.keywords else ast.Constant(0))
        method = ast.Attribute(ast.Name(RUNNER, ast.Load()), STACK, ast.Load())
        return ast.copy_location(ast.Call(method, [ast.Name(name, ast.Load()), node.args[0], dim], []), node)

    def visit_For(self, node: ast.For):
        self.generic_visit(node)
        k = self.liftable_lines.get(node.lineno)
        if k is None:
            return node
        rng, rev = _range_of(node.iter)
        r = f"__wf_r{k}"
        # the range's bounds, not a range object: under torch.export they stay symbolic (range() would fix them)
        bounds = ast.Tuple(list(rng.args), ast.Load())
        call = ast.Call(ast.Name(RUNNER, ast.Load()), [ast.Constant(k), ast.Call(ast.Name("locals", ast.Load()), [], []),
                                                       bounds, ast.Constant(rev)], [])
        names = assigned_after(self.sites[k])
        unpack = ast.Assign([ast.Tuple([ast.Name(n, ast.Store()) for n in names], ast.Store())], ast.Name(r, ast.Load()))
        test = ast.Compare(ast.Name(r, ast.Load()), [ast.Is()], [ast.Constant(None)])
        # a stacked-outputs name is None when the original loop ran (then the list is stacked as written)
        unset = [ast.Assign([ast.Name(o.stacked, ast.Store())], ast.Constant(None)) for o in self.sites[k].outputs
                 if o.stacked]
        return [*unset, ast.Assign([ast.Name(r, ast.Store())], call), ast.If(test, [node], [unpack])]


def assigned_after(site: LoopSite) -> list[str]:
    """The names a lifted loop's runner returns, in order: carry, temporaries, loop index, then the
    stacked outputs of lists only ever stacked after the loop."""
    return [*site.carries, *site.temps, site.index, *(o.stacked for o in site.outputs if o.stacked)]


def rewrite_function(fn, sites: list[LoopSite], runner) -> types.FunctionType:
    """`fn` with each liftable site k replaced by a call runner(k, locals(), bounds, reversed) and the
    original loop as the fallback. Same globals, defaults and closure as `fn`."""
    fdef = function_ast(fn)
    fdef.decorator_list = []
    lines = {s.lineno: k for k, s in enumerate(sites) if s.liftable}
    tr = _ReplaceLoops(lines, sites)
    if fn.__globals__.get("torch") is torch:  # `torch.stack` is torch's own: stacks may be deferred
        loops = {n.lineno: n for n in ast.walk(fdef) if isinstance(n, ast.For)}
        for k in lines.values():
            for j, calls in deferred_stacks(fdef, loops[sites[k].lineno], sites[k]).items():
                sites[k].outputs[j].stacked = f"__wf_s{k}_{j}"
                tr.stack_calls.update({id(c): sites[k].outputs[j].stacked for c in calls})
    fdef = tr.visit(fdef)
    freevars = fn.__code__.co_freevars
    factory = ast.FunctionDef("__wf_factory", ast.arguments([], [ast.arg(RUNNER), *[ast.arg(v) for v in freevars]], None, [], [], None, []),
                              [fdef, ast.Return(ast.Name(fdef.name, ast.Load()))], [], None, None)
    mod = ast.fix_missing_locations(ast.Module([factory], []))
    ns: dict = {}
    exec(compile(mod, fn.__code__.co_filename, "exec"), ns)
    make = types.FunctionType(ns["__wf_factory"].__code__, fn.__globals__, "__wf_factory")
    cells = [c.cell_contents for c in (fn.__closure__ or ())]
    new = make(runner, *cells)
    new.__defaults__, new.__kwdefaults__ = fn.__defaults__, fn.__kwdefaults__
    new.__qualname__, new.__doc__ = fn.__qualname__, fn.__doc__
    return new


def uses_private_names(fn) -> bool:
    """Names like self.__x are mangled at class compile time; a recompiled copy would miss them."""
    return any(n.startswith("__") and not n.endswith("__") for n in fn.__code__.co_names)


__all__ = ["LoopOutput", "LoopSite", "STACK", "assigned_after", "deferred_stacks", "find_time_loops", "function_ast", "has_source",
           "rewrite_function",
           "uses_private_names"]
