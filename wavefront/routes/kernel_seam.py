"""transformers' kernel seam: the module-level functions a modeling file declares under the name of
an external package's API (mamba_ssm, causal-conv1d, flash-linear-attention).

transformers 5.x decorates each such function with
`@use_kernel_func_from_hub_with_fallback("<api name>", "<package>")`: the call runs the package's
kernel when it is installed, else the function's own PyTorch body. The seam is read from the
modeling file's source (the decorator and its API name) and checked against the live global (the
decorator's wrapper, which closes over the body and keeps it as __wrapped__), so a function the
user replaced or wrapped is not taken for a seam. Only globals that the methods of the model's own module classes call are kept.
transformers 4.x binds these names to the packages' functions or to None and picks the PyTorch
path by device inside the mixers: there is no seam to fill (the time-loop route lifts those loops).
"""
from __future__ import annotations

import ast
import inspect
import sys
import types
import weakref
from dataclasses import dataclass
from typing import Callable

from torch import nn

SEAM_DECORATOR = "use_kernel_func_from_hub_with_fallback"
_declared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {global name: api name}


@dataclass(frozen=True)
class Seam:
    """One seam function a model calls: `namespace.name` is the global its code calls, `api` the
    external API it stands for, `original` the global as it was found, `callers` the classes
    whose methods call it, `served_by` the package serving it (None: its PyTorch fallback runs)."""

    namespace: types.ModuleType
    name: str
    api: str
    original: Callable
    callers: tuple[str, ...]
    served_by: str | None


def _decorator_api(decorator: ast.expr) -> tuple[str, str] | None:
    if not isinstance(decorator, ast.Call) or len(decorator.args) < 2:
        return None
    func = decorator.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    args = decorator.args
    if name != SEAM_DECORATOR or not all(isinstance(a, ast.Constant) and isinstance(a.value, str) for a in args[:2]):
        return None
    return args[0].value, args[1].value


def declared_seams(namespace: types.ModuleType) -> dict[str, tuple[str, str]]:
    """{global name: (api name, package)} of the seam functions a module's source declares.

    >>> import wavefront.routes.kernel_seam as ks
    >>> ks.declared_seams(ks)
    {}
    """
    if namespace not in _declared:
        try:
            tree = ast.parse(inspect.getsource(namespace))
        except (OSError, TypeError, SyntaxError):
            tree = ast.Module(body=[], type_ignores=[])
        _declared[namespace] = {node.name: api for node in tree.body if isinstance(node, ast.FunctionDef)
                                for api in map(_decorator_api, node.decorator_list) if api}
    return _declared[namespace]


def served_by(fn: Callable, package: str) -> str | None:
    """The package serving a seam wrapper (None when its own PyTorch body runs): transformers'
    wrapper closes over `is_new_implementation` (True when the package's function was imported)."""
    f, seen = fn, 0
    while f is not None and seen < 8:
        try:
            nonlocals = inspect.getclosurevars(f).nonlocals
        except (TypeError, ValueError):
            nonlocals = {}
        if nonlocals.get("is_new_implementation"):
            return package
        f, seen = getattr(f, "__wrapped__", None), seen + 1
    return None


def _is_seam_wrapper(fn, name: str, namespace: types.ModuleType) -> bool:
    """Is the global transformers' own wrapper of the function the source declares (its closure
    holds that function as `torch_function`, kept as __wrapped__)? A user's wrapper around it, or a
    replacement, is not."""
    try:
        body = inspect.getclosurevars(fn).nonlocals.get("torch_function")
    except (TypeError, ValueError):
        return False
    return (body is not None and getattr(fn, "__wrapped__", None) is body and getattr(body, "__name__", "") == name
            and getattr(body, "__module__", "") == namespace.__name__)


def _code_names(cls: type) -> set[str]:
    """The global names the functions defined on a class (and their nested functions) read."""
    names: set[str] = set()
    functions = [inspect.unwrap(getattr(v, "__func__", v)) for v in vars(cls).values()]  # past decorators
    stack = [f.__code__ for f in functions if hasattr(f, "__code__")]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


def find_seams(model: nn.Module) -> list[Seam]:
    """The seam functions the classes of `model`'s modules call, in the order first met.

    >>> find_seams(nn.Linear(2, 2))
    []
    """
    by_namespace: dict[str, list[type]] = {}
    for cls in dict.fromkeys(type(m) for m in model.modules()):
        by_namespace.setdefault(cls.__module__, []).append(cls)
    seams = []
    for module_name, classes in by_namespace.items():
        namespace = sys.modules.get(module_name)
        declared = declared_seams(namespace) if namespace is not None else {}
        if not declared:
            continue
        names = {cls.__name__: _code_names(cls) for cls in classes}
        for name, (api, package) in declared.items():
            fn = getattr(namespace, name, None)
            callers = tuple(c for c, used in names.items() if name in used)
            if callers and _is_seam_wrapper(fn, name, namespace):
                seams.append(Seam(namespace, name, api, fn, callers, served_by(fn, package)))
    return seams


__all__ = ["SEAM_DECORATOR", "Seam", "declared_seams", "find_seams", "served_by"]
