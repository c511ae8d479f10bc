"""Imports point one way: contract -> models -> scheduler -> passes -> backends -> api/cli.

Read from the source (every import statement, those inside functions too), not from what
happens to be loaded: a module may import only from its own layer or the layers before it, and
no modules import each other in a circle.
"""
import ast
import os

import networkx as nx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"wavefront": "wavefront", "scheduler": "wavefront.scheduler", "passes": "wavefront.passes",
            "backends": "wavefront.backends"}  # folder -> installed name (pyproject.toml)
LAYERS = ["wavefront.contract", "wavefront.models", "wavefront.scheduler", "wavefront.passes", "wavefront.backends",
          "wavefront"]  # the last: the public API, CLI, export entry points, benchmarks harness


def layer(module: str) -> int:
    return next(i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + "."))


def internal_imports():
    """(importer, imported, line) for every import of a wavefront module in the package sources."""
    out = []
    for folder, name in PACKAGES.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.join(ROOT, folder))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                module = ".".join([name, *rel])
                package = module if f == "__init__.py" else module.rsplit(".", 1)[0]
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.ImportFrom):
                        if node.level:
                            base = package.split(".")[:len(package.split(".")) - node.level + 1]
                            targets = [".".join(base + ([node.module] if node.module else []))]
                        else:
                            targets = [node.module or ""]
                        if node.module is None or targets[0] == package:  # `from . import x`: the submodules
                            targets = [f"{targets[0]}.{a.name}" for a in node.names]
                    elif isinstance(node, ast.Import):
                        targets = [a.name for a in node.names]
                    else:
                        continue
                    out += [(module, t, node.lineno) for t in targets if t == "wavefront" or t.startswith("wavefront.")]
    return out


def test_no_module_imports_from_a_later_layer():
    upward = [f"{a}:{line} imports {b}" for a, b, line in internal_imports() if layer(b) > layer(a)]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_circles():
    g = nx.DiGraph()
    for a, b, _ in internal_imports():
        if a != b and not a.startswith(b + "."):  # a package's own __init__ is not a circle
            g.add_edge(a, b)
    cycles = sorted(sorted(c) for c in nx.simple_cycles(g))
    assert not cycles, "modules that import each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)
