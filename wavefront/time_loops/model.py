"""Models whose modules run Python time loops: optimize() lifts each loop that is affine in its
carry into a scan, per call, by swapping the rewritten methods in on the module instances for
the duration of the call (restored afterwards, also on error).

The lifted method asks its LoopRunner first and falls back to its own loop, so a loop the
runner declines (not affine, an empty range) runs exactly as written; explain() says which
loops ran as scans and why the others did not.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import types
import warnings
from dataclasses import dataclass

from torch import nn

from wavefront.routes.base import Optimized
from wavefront.routes.explanation import NO_SEGMENTS, Explanation
from wavefront.time_loops.runner import LoopRunner
from wavefront.time_loops.source import (
    LoopSite,
    find_time_loops,
    function_ast,
    has_source,
    rewrite_function,
    uses_private_names,
)


@dataclass
class LiftedFunction:
    """One function (a module method, or a module-level function a method calls) with its loops and
    the rewritten version, if any loop can run as a scan."""

    owner: type | str  # the class of a method, the module name of a function
    name: str
    sites: list[LoopSite]
    runner: LoopRunner | None
    function: object | None  # the rewritten function, None if nothing in it can be lifted

    def verdicts(self, module: nn.Module | None = None) -> list[tuple[LoopSite, str, bool]]:
        """(site, status, runs as a scan?) per loop; `module` (an instance) lets a loop that has
        not run yet be judged now."""
        out = []
        for k, s in enumerate(self.sites):
            if not s.liftable:
                out.append((s, f"left as a loop: {s.reason}", False))
                continue
            status = self.runner.status_for(k, module)
            if status == "not run yet" and module is not None:
                status = self.runner.preview(k, module)
            out.append((s, status, not status.startswith("left as a loop")))
        return out

    def report(self, module: nn.Module | None = None) -> list[str]:
        """One line per loop: lifted or not, and why."""
        return [f"{s.where()}: loop over `{s.index}`" + (f", carr{'y' if len(s.carries) == 1 else 'ies'} " + ", ".join(f"`{c}`" for c in s.carries)
                                                                 if s.liftable else "")
                + f": {status}" for s, status, _ in self.verdicts(module)]


# One rewritten function (and runner) per class method, shared by every instance and model: the
# source is parsed once. A runner keeps at most 16 plans (see LoopRunner), so what it holds on to
# stays bounded.
_CACHE: dict = {}


def _lift(owner: type, name: str, fn) -> LiftedFunction | None:
    if fn in _CACHE:
        return _CACHE[fn]
    sites = find_time_loops(fn)
    lifted = None
    if sites:
        runner, new = None, None
        if uses_private_names(fn):
            for s in sites:
                s.reason = s.reason or "the method uses private (name-mangled) attributes"
        elif any(s.liftable for s in sites):
            runner = LoopRunner(sites, fn.__globals__)
            new = rewrite_function(fn, sites, runner)
        lifted = LiftedFunction(owner, name, sites, runner, new)
    _CACHE[fn] = lifted
    return lifted


def _methods(model: nn.Module):
    """(module, class, name, function) for every method of every module in `model`, torch's own aside."""
    for m in model.modules():
        seen = set()
        for cls in type(m).__mro__:
            if not issubclass(cls, nn.Module) or cls.__module__.startswith("torch."):
                continue
            for name, fn in vars(cls).items():
                if name in seen or name.startswith("__") or not callable(fn) or not hasattr(fn, "__code__"):
                    continue
                seen.add(name)
                yield m, cls, name, fn


@dataclass(eq=False)
class FunctionSlot:
    """Where a method finds a module-level function it calls: `namespace[name]` (the caller's
    globals), holding `original`. The lifted version is put there for the duration of a call."""

    namespace: dict
    name: str
    original: object


_CALLS: dict = {}  # code object -> (names it calls, methods it calls on self): what its source says, read once


def _calls(fn) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names `fn` calls as `name(...)` and as `self.name(...)`, read from its source (none without one)."""
    code = getattr(fn, "__code__", None)
    if code not in _CALLS:
        fdef = function_ast(fn) if code is not None else None
        calls = [n for n in ast.walk(fdef) if isinstance(n, ast.Call)] if fdef is not None else []
        by_name = tuple(dict.fromkeys(c.func.id for c in calls if isinstance(c.func, ast.Name)))
        on_self = tuple(dict.fromkeys(c.func.attr for c in calls if isinstance(c.func, ast.Attribute)
                                      and isinstance(c.func.value, ast.Name) and c.func.value.id == "self"))
        _CALLS[code] = (by_name, on_self)
    return _CALLS[code]


def _called_functions(fn, depth: int = 2):
    """(namespace, name, function) for the module-level Python functions `fn` calls by name, and
    those they call, `depth` levels down (torch's own aside), looked up in the namespaces now."""
    out, todo, seen = [], [(fn, depth)], {fn}
    while todo:
        f, d = todo.pop()
        for name in _calls(f)[0] if d else ():
            callee = f.__globals__.get(name)
            if isinstance(callee, types.FunctionType) and callee not in seen and \
                    not (callee.__module__ or "").startswith("torch"):
                seen.add(callee)
                out.append((f.__globals__, name, callee))
                todo.append((callee, d - 1))
    return out


@dataclass(eq=False)
class PartialSlot:
    """Where a method finds a function it calls through an instance attribute: `module.<attribute>`
    holding `original`, a plain function or a `functools.partial` binding functions (xLSTM's
    `self._inference_fn = partial(f, kernel=partial(g, ...))`). For a call, the attribute holds the
    same (partial) with the lifted function in place of `original_function`, wherever it is bound."""

    module: nn.Module
    attribute: str
    original: object
    original_function: object


def _bound_functions(obj, depth: int = 4) -> list:
    """The Python functions a partial binds: its function and those in its arguments, nested
    partials included."""
    if isinstance(obj, types.FunctionType):
        return [obj]
    if type(obj) is not functools.partial or depth == 0:  # a subclass may call differently: not followed
        return []
    return [f for part in (obj.func, *obj.args, *obj.keywords.values()) for f in _bound_functions(part, depth - 1)]


def _substituted(obj, table: dict):
    """`obj` (a partial, nested) with every function in `table` replaced by its value."""
    if type(obj) is functools.partial:
        return functools.partial(_substituted(obj.func, table), *(_substituted(a, table) for a in obj.args),
                                 **{k: _substituted(v, table) for k, v in obj.keywords.items()})
    return table.get(obj, obj) if isinstance(obj, types.FunctionType) else obj


def _partials_called(m: nn.Module, fn) -> list[tuple[str, object]]:
    """(attribute, value) for the `self.<attribute>(...)` calls in `fn` that reach a partial or a
    plain function held on the instance `m` (`self.kernel = partial(f, ...)`, `self.fn = f`)."""
    return [(name, m.__dict__[name]) for name in _calls(fn)[1]
            if type(m.__dict__.get(name)) is functools.partial or isinstance(m.__dict__.get(name), types.FunctionType)]


def _reached_from_forward(cls: type) -> set[str]:
    """The names of `forward` and of the methods it calls as `self.<name>(...)`, two levels down."""
    names, todo = {"forward"}, ["forward"]
    for _ in range(2):
        todo = [m for name in todo for m in _calls(getattr(cls, name, None))[1]
                if m not in names and callable(getattr(cls, m, None))]
        names.update(todo)
    return names


def model_time_loops(model: nn.Module) -> list[tuple[nn.Module | FunctionSlot, LiftedFunction]]:
    """(module, lifted function) for every method, of every module in `model`, that holds a
    `for ... in range(...)` loop (lifted or not), (FunctionSlot, lifted function) for every
    module-level function those methods call (directly or through another) that holds one, and
    (PartialSlot, lifted function) for every function bound in a partial they call as
    `self.<attribute>(...)` that holds one."""
    found, slots, reach = [], set(), {}

    def functions_called_by(fn):  # the module-level functions `fn` reaches, each slot once
        for namespace, fname, callee in _called_functions(fn):
            lifted = _lift(callee.__module__, fname, callee) if (id(namespace), fname) not in slots else None
            if lifted is not None:
                slots.add((id(namespace), fname))
                found.append((FunctionSlot(namespace, fname, callee), lifted))

    for m, cls, name, fn in _methods(model):
        lifted = _lift(cls, name, fn)
        if lifted is not None:
            found.append((m, lifted))
        if type(m) not in reach:
            reach[type(m)] = _reached_from_forward(type(m))
        if name not in reach[type(m)]:
            continue  # functions only from what a call runs (not weight tying, init, ...)
        functions_called_by(fn)
        for attribute, bound in _partials_called(m, fn):
            for f in _bound_functions(bound):
                if (id(m), attribute, f) in slots:
                    continue
                slots.add((id(m), attribute, f))
                lifted = _lift(f.__module__, f.__qualname__, f)
                if lifted is not None:
                    found.append((PartialSlot(m, attribute, bound, f), lifted))
                functions_called_by(f)
    return found


def methods_without_source(model: nn.Module) -> list[str]:
    """The methods that call range() but whose source cannot be read (a class typed into a REPL or
    piped on stdin), where they were defined: their loops cannot be found.

    >>> methods_without_source(nn.Linear(2, 2))
    []
    """
    functions = {fn for _, _, _, fn in _methods(model) if "range" in fn.__code__.co_names}  # each read once
    return sorted(f"{fn.__qualname__} (defined in {fn.__code__.co_filename})" for fn in functions if not has_source(fn))


class LoopLiftedModel(Optimized):
    """`model` with its affine time loops run as scans; same forward signature and outputs."""

    route = "time loops"

    def __init__(self, model: nn.Module, loops: list[tuple[nn.Module, LiftedFunction]], options: dict | None = None,
                 verify: bool = False):
        super().__init__(model, options or {}, verify)
        self.loops = loops

    @contextlib.contextmanager
    def _lifted(self):
        """Methods go on the instances, functions into the namespace their callers read them from;
        both come back afterwards, also on error. (A function swapped in its module's namespace is
        seen by every caller meanwhile: it computes the same, falling back to its own loop.)"""
        installed, swapped, partials = [], [], {}
        try:
            for m, lf in self.loops:
                if lf.function is None:
                    continue
                if isinstance(m, PartialSlot):  # gathered: one partial may bind several lifted functions
                    if m.module.__dict__.get(m.attribute) is m.original:
                        partials.setdefault((id(m.module), m.attribute), (m, {}))[1][m.original_function] = lf.function
                elif isinstance(m, FunctionSlot):
                    if m.namespace.get(m.name) is m.original:
                        m.namespace[m.name] = lf.function
                        swapped.append(m)
                elif lf.name not in m.__dict__:
                    m.__dict__[lf.name] = lf.function.__get__(m)
                    installed.append((m, lf.name))
            for slot, table in partials.values():
                rebuilt = _substituted(slot.original, table)
                slot.module.__dict__[slot.attribute] = rebuilt
                installed.append((slot, rebuilt))
            yield
        finally:
            for m, name in installed:
                if not isinstance(m, PartialSlot):
                    del m.__dict__[name]
                elif m.module.__dict__.get(m.attribute) is name:  # unless the call itself set the attribute anew
                    m.module.__dict__[m.attribute] = m.original
            for slot in swapped:
                slot.namespace[slot.name] = slot.original

    def running(self):
        return self._lifted()

    def run(self, *args, **kwargs):
        with self._lifted():
            return self.model(*args, **kwargs)

    def describe_route(self) -> str:
        return "its loops run as scans"

    def rewrites(self) -> list[str]:
        return self.report()

    def export_kind(self) -> str:
        return "time-loops"

    def explain(self, n_segments: int | None = None) -> Explanation:
        return Explanation(type(self.model).__name__, "time-loops", "Python time loops:\n  " + "\n  ".join(self.report()),
                           NO_SEGMENTS, "loops as scans" if self.lifted_any else "unchanged", 0, None)

    @property
    def lifted_any(self) -> bool:
        """Does (or will) any loop run as a scan?"""
        return any(scan for m, lf in self.loops for _, _, scan in lf.verdicts(_instance(m)))

    def report(self) -> list[str]:
        """One line per loop; a method whose instances fared differently gets a line per
        instance, named."""
        names = {id(m): name or type(m).__name__ for name, m in self.model.named_modules()}
        per_method: dict[int, list] = {}
        for m, lf in self.loops:
            per_method.setdefault(id(lf), []).append((m, lf.report(_instance(m))))
        lines = []
        for reports in per_method.values():
            if all(r == reports[0][1] for _, r in reports):
                lines.extend(reports[0][1])
            else:
                lines.extend(f"{line} [in {names.get(id(m), type(m).__name__)}]" for m, r in reports for line in r)
        return lines


def _instance(target) -> nn.Module | None:
    return target if isinstance(target, nn.Module) else target.module if isinstance(target, PartialSlot) else None


def recognise(model: nn.Module) -> str | None:
    """'' when a method of a module in `model` holds a time loop (lifted or not); why not when
    methods that may hold one have no readable source; None otherwise."""
    if model_time_loops(model):
        return ""
    unreadable = methods_without_source(model)
    if unreadable:
        return (f"the source of {', '.join(unreadable)} is not available, so its loops cannot be read (a class typed "
                "into a REPL or piped on stdin): define it in a file to have its time loops run as scans")
    return None


def build(model: nn.Module, options: dict, verify: bool, log) -> LoopLiftedModel:
    loops = log.run("find time loops", lambda: model_time_loops(model),
                    lambda found: f"{len(found)} method(s) holding a time loop")
    lifted = log.run("lift loops", lambda: LoopLiftedModel(model, loops, options, verify), lambda m: "\n".join(m.report()))
    object.__setattr__(lifted, "stage_log", log)
    if not lifted.lifted_any:
        warnings.warn(f"{type(model).__name__}: no time loop can run as a scan, the model runs as it is:\n"
                      + "\n".join(lifted.report()), stacklevel=3)
    return lifted


def preview(model: nn.Module, n_segments: int | None = None) -> Explanation:
    return LoopLiftedModel(model, model_time_loops(model)).explain(n_segments)


__all__ = ["FunctionSlot", "LiftedFunction", "LoopLiftedModel", "PartialSlot", "build", "model_time_loops", "preview", "recognise"]
