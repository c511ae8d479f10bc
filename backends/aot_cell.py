"""backend="aot_inductor": a lane-folded cell compiled ahead of time by AOTInductor.

torch.compile pays, on every call, dynamo's guard check and the Python wrapper inductor writes
around its kernels: about 0.3 ms, a quarter of a dispatch-bound diagonal step. AOTInductor
(torch.export + torch._inductor.aoti_compile_and_package) compiles the same graph with a C++
wrapper and no guards, so that cost goes; what is lost is the guard, and this file puts back
exactly the part that matters: a call runs the package only when every input has the dtype, the
rank and the static sizes the package was compiled for and each dynamic size lies in its range
(sizes torch.export tied together must still be equal). Any other call, a single lane included,
runs the eager folded graph: never a silently wrong shape.

Nothing is frozen into the package: the tensors the folded graph holds (lane-invariant buffers,
the shared norm weights inside a Hugging Face block) are package inputs, swapped in with
torch.func.functional_call and read afresh on every call; a graph whose export would still hold
module state is not compiled ahead of time and takes torch.compile instead, the reason kept.
Packages are kept in wavefront's on-disk cache ($WAVEFRONT_CACHE_DIR/aot_inductor, beside the
native kernels and exported ONNX graphs), keyed by the graph's code, the inputs' shapes and
dtypes and the torch version, so a second process skips export and compile (the tiny test ARMT's first
call: 1.9 s from the cache, 38 s cold). The shape guard is kept in the package's metadata file;
a package that is truncated, corrupt, another key's or another user's is never loaded
(backends.disk_cache checks size, sha256 and owner) and is compiled again.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import fx
from torch.utils import _pytree as pytree
from torch.utils._pytree import tree_flatten, tree_unflatten
from wavefront.backends.disk_cache import cache_dir, cached_entry, load_entry
from wavefront.scheduler.capture import get_attr_path


class AotNotApplicable(Exception):
    pass


def state_names(folded: fx.GraphModule) -> list[str]:
    """Every tensor the folded graph holds (parameters, buffers, tensors read by get_attr): what
    the package takes as inputs, read afresh on every call, so that nothing is frozen into it.

    >>> state_names(fx.symbolic_trace(torch.nn.Linear(2, 2)))
    ['weight', 'bias']
    """
    names = [n for n, _ in folded.named_parameters()] + [n for n, _ in folded.named_buffers()]
    for node in folded.graph.nodes:
        if node.op == "get_attr" and node.target not in names and \
                isinstance(get_attr_path(folded, node.target), torch.Tensor):
            names.append(node.target)
    return names


class _FlatCall(torch.nn.Module):
    """What torch.export sees: flat tensors (the row-folded inputs, the stacked parameters, the
    folded graph's own state), the lane count carried as the size of a [lanes, 0] marker
    (torch.export specialises plain ints). The graph runs through functional_call with its state
    swapped for those inputs, and is not a registered submodule: export finds no module state to
    freeze."""

    def __init__(self, graph: fx.GraphModule, spec, constants: dict[int, object], param_names: list[str],
                 state: list[str]):
        super().__init__()
        object.__setattr__(self, "graph_module", graph)
        self.spec, self.constants, self.param_names, self.state = spec, constants, param_names, state

    def forward(self, marker, *tensors):
        n_rows = len(tensors) - len(self.param_names) - len(self.state)
        rows = iter(tensors[:n_rows])
        params = dict(zip(self.param_names, tensors[n_rows:n_rows + len(self.param_names)]))
        state = dict(zip(self.state, tensors[n_rows + len(self.param_names):]))
        leaves = [self.constants[i] if i in self.constants else next(rows) for i in range(self.spec.num_leaves)]
        args, kwargs = tree_unflatten(leaves, self.spec)
        return torch.func.functional_call(self.graph_module, state, args, {**kwargs, **params, "lanes": marker.shape[0]},
                                          tie_weights=False, strict=True)


class ShapeGuard:
    """The shapes an exported program accepts: per input, dtype, rank, static sizes, and for each
    dynamic size its symbol (equal symbols must get equal sizes) and range.

    >>> import torch
    >>> ep = torch.export.export(torch.nn.ReLU(), (torch.zeros(3, 4),),
    ...                          dynamic_shapes=({0: torch.export.Dim.AUTO},))
    >>> g = ShapeGuard(ep, [torch.zeros(3, 4)])
    >>> g.admits([torch.zeros(5, 4)]), g.admits([torch.zeros(5, 3)]), g.admits([torch.zeros(5, 4).double()])
    (True, False, False)
    """

    def __init__(self, ep, inputs: list[torch.Tensor]):
        import sympy
        user = [n for n in ep.graph.nodes if n.op == "placeholder"]
        sig = ep.graph_signature
        if sig.inputs_to_parameters or sig.inputs_to_buffers or sig.inputs_to_lifted_tensor_constants:
            raise AotNotApplicable("the exported cell still holds module state (parameters, buffers or tensor "
                                   "constants) that the package would freeze")
        if len(user) != len(inputs):
            raise AotNotApplicable(f"the exported program takes {len(user)} inputs, the call has {len(inputs)}")
        self._memo: dict = {}  # (dtype, shape) per input -> admitted?
        self.checks = []  # (dtype, rank, [(dim, static int or symbol name)])
        for node, x in zip(user, inputs):
            dims = []
            for d, size in enumerate(node.meta["val"].shape):
                expr = sympy.Integer(size) if isinstance(size, int) else size.node.expr
                if expr.is_Integer:  # static (or specialised by export)
                    dims.append((d, int(expr)))
                    continue
                if not isinstance(expr, sympy.Symbol):
                    raise AotNotApplicable(f"an input size is a derived expression ({expr}); only plain sizes "
                                           "are guarded")
                dims.append((d, str(expr)))
            self.checks.append((x.dtype, x.dim(), dims))
        self.ranges = {}
        for sym, vr in ep.range_constraints.items():
            lo = int(vr.lower) if vr.lower.is_Integer else 0  # bounds may be (int) infinity
            hi = int(vr.upper) if vr.upper.is_Integer else None
            self.ranges[str(sym)] = (lo, hi)

    def to_json(self) -> str:
        return json.dumps({"checks": [[str(dtype).replace("torch.", ""), rank, dims] for dtype, rank, dims in self.checks],
                           "ranges": self.ranges})

    @classmethod
    def from_json(cls, text: str) -> "ShapeGuard":
        data = json.loads(text)
        guard = cls.__new__(cls)
        guard._memo = {}
        guard.checks = [(getattr(torch, dtype), rank, [tuple(d) for d in dims]) for dtype, rank, dims in data["checks"]]
        guard.ranges = {k: tuple(v) for k, v in data["ranges"].items()}
        return guard

    def admits(self, inputs) -> bool:
        # The same few shapes come back every step (lanes 2..L, then the drain): remember the
        # verdicts (keyed by every input's dtype and shape, so nothing is assumed).
        key = tuple((x.dtype, x.shape) for x in inputs)
        verdict = self._memo.get(key)
        if verdict is None:
            verdict = self._admits(inputs)
            if len(self._memo) < 256:
                self._memo[key] = verdict
        return verdict

    def _admits(self, inputs) -> bool:
        if len(inputs) != len(self.checks):
            return False
        bound = {}
        for x, (dtype, rank, dims) in zip(inputs, self.checks):
            if x.dtype != dtype or x.dim() != rank:
                return False
            shape = x.shape
            for d, want in dims:
                if isinstance(want, int):
                    if shape[d] != want:
                        return False
                elif bound.setdefault(want, shape[d]) != shape[d]:
                    return False
        for sym, size in bound.items():
            lo, hi = self.ranges.get(sym, (0, None))
            if size < lo or (hi is not None and size > hi):
                return False
        return True


class AotFoldedCell:
    """Callable like a FoldLaneCell's folded graph (*args, lanes=n, **kwargs; the stacked
    parameters are the `lane_*` keywords): built on the first call, or loaded from the disk cache,
    then each call runs the package when its shapes are admitted and the eager graph otherwise. A
    cell that cannot be compiled ahead of time takes torch.compile (dynamic) instead, the reason
    kept in `reason`.

    Built by optimize(model, backend="aot_inductor") (backends.inductor.compile_batched with
    aot=True) on each lane-folded cell; not run here, a cold compile takes tens of seconds:

        fast = wavefront.optimize(model, backend="aot_inductor")
        fast(input_ids)   # the first batched call exports, compiles (or loads) the package
    """

    def __init__(self, folded: fx.GraphModule, compile_kwargs: dict | None = None):
        self.folded = folded
        self.compile_kwargs = {"dynamic": True, "fullgraph": True, **(compile_kwargs or {})}
        self.runner = None
        self.fallback = None  # torch.compile of the folded graph, when AOT does not apply
        self.reason = ""
        self.package_path = ""
        self.loaded_from_cache = False
        self._markers: dict[tuple, torch.Tensor] = {}

    @property
    def traced_by_dynamo(self) -> bool:
        """Whether the next call may trace (the build exports, the fallback is torch.compile);
        once the package runs, calls go straight to it."""
        return self.runner is None or self.fallback is not None

    @staticmethod
    def _split(args, kwargs):
        params = {k: v for k, v in kwargs.items() if k.startswith("lane_")}
        rest = {k: v for k, v in kwargs.items() if not k.startswith("lane_")}
        leaves, spec = tree_flatten((args, rest))
        return params, leaves, spec

    def __call__(self, *args, lanes: int, **kwargs):
        if self.fallback is not None:
            return self.fallback(*args, lanes=lanes, **kwargs)
        params, leaves, spec = self._split(args, kwargs)
        if self.runner is None:
            try:
                self._build(params, leaves, spec, lanes)
            except Exception as e:  # export or the AOT compile refused this graph: torch.compile it instead
                self.reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
                self.fallback = torch.compile(self.folded, **self.compile_kwargs)
                return self.fallback(*args, lanes=lanes, **kwargs)
        if spec != self.spec or list(params) != self.param_names or \
                [x for x in leaves if not isinstance(x, torch.Tensor)] != self.constant_values:
            return self.folded(*args, lanes=lanes, **kwargs)
        inputs = [self._marker(lanes, params), *(x for x in leaves if isinstance(x, torch.Tensor)), *params.values(),
                  *(get_attr_path(self.folded, n) for n in self.state)]
        if not self.guard.admits(inputs):
            return self.folded(*args, lanes=lanes, **kwargs)
        # The loader itself, not the package's __call__ (which re-parses its pytree specs on
        # every call): the inputs are flat already.
        outs = self.runner.loader.boxed_run([x.contiguous() for x in inputs])
        return tuple(outs) if self.flat_out else tree_unflatten(outs, self.out_spec)

    @property
    def label(self) -> str:
        """How this cell runs, for explain()."""
        if self.fallback is not None:
            return f"compiled by torch.compile (AOTInductor did not apply: {self.reason})"
        if self.runner is None:
            return "compiled ahead of time (AOTInductor) on its first batched call"
        return ("compiled ahead of time (AOTInductor" + (", package loaded from the disk cache" if self.loaded_from_cache
                else "") + "; calls with shapes it was not built for, a single lane among them, run eager)")

    def _marker(self, lanes: int, params: dict) -> torch.Tensor:
        """An empty [lanes, 0] tensor on the cell's device (its stacked parameters'): the lane
        count as an input size."""
        device = next(iter(params.values())).device if params else None
        m = self._markers.get((lanes, device))
        if m is None:
            m = self._markers[(lanes, device)] = torch.empty(lanes, 0, device=device)
        return m

    def _build(self, params, leaves, spec, lanes):
        from torch.export import Dim, export
        self.state = state_names(self.folded)
        self.spec, self.param_names = spec, list(params)
        constants = {i: x for i, x in enumerate(leaves) if not isinstance(x, torch.Tensor)}
        self.constant_values = list(constants.values())
        call = _FlatCall(self.folded, spec, constants, self.param_names, self.state)
        # The example doubles the batch rows (rows = lanes x batch), so that torch.export does not
        # tie the row count to the lane count because they happened to be equal (batch 1).
        rows = [torch.cat([x, x]) for x in leaves if isinstance(x, torch.Tensor)]
        example = (self._marker(lanes, params), *rows, *params.values(), *(get_attr_path(self.folded, n) for n in self.state))
        example = tuple(x.contiguous() for x in example)
        dims = [{d: Dim.AUTO for d in range(x.dim()) if x.shape[d] > 1} for x in example]  # sizes 0/1 stay static
        dynamic = (dims[0], tuple(dims[1:]))  # forward(marker, *tensors)
        key = self._cache_key(example)
        path = os.path.join(cache_dir("aot_inductor"), key + ".pt2")
        entry = load_entry(path, key)  # checked (size, sha256, owner): no export, no compile
        if entry is None:
            ep = export(call, example, dynamic_shapes=dynamic, strict=False)
            guard = ShapeGuard(ep, list(example))

            def compile_to(tmp):
                torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
                return {"guard": guard.to_json()}  # kept in the entry's metadata file
            entry = cached_entry(path, key, compile_to)  # another process may have built it meanwhile
        self.guard = ShapeGuard.from_json(entry.extra["guard"])
        self.loaded_from_cache = not entry.built
        path = entry.path
        self.runner = torch._inductor.aoti_load_package(path)
        self.out_spec = pytree.treespec_loads(self.runner.loader.get_call_spec()[1])
        n = self.out_spec.num_leaves  # a plain tuple of tensors comes back as one, without rebuilding it
        self.flat_out = tree_unflatten(list(range(n)), self.out_spec) == tuple(range(n))
        self.package_path = path

    def _cache_key(self, example) -> str:
        """The graph's code (its submodules' too), the example's shapes, dtypes and devices, the
        call's structure and the torch version: what the package and its guard depend on."""
        h = hashlib.sha256()
        for name, m in self.folded.named_modules():
            h.update(f"{name}:{type(m).__module__}.{type(m).__qualname__}".encode())
            if isinstance(m, fx.GraphModule):
                h.update(m.code.encode())
        h.update(repr([(x.dtype, tuple(x.shape), x.device.type) for x in example]).encode())
        h.update(repr((self.spec, self.constant_values, self.param_names, self.state,
                       torch.__version__)).encode())
        return h.hexdigest()[:32]

