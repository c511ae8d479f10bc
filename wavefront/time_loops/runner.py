"""Run a Python time loop, found by scheduler.time_loops, as a first-order scan.

For a loop `for i in range(n): h = body(h, i, ...)` the body is compiled into two functions of
(carry, i, the tensors it reads): `step` (returns the new carry) and `outputs` (returns the
per-iteration output values). `step` is traced with torch.fx once per call (its size does not
depend on n) and proved affine in the carry (affine_carry.py); then
  a(i), b(i) for all i at once (vmap over the index tensor) -> linear_scan -> all carries;
  outputs for all i at once (vmap of the body over the index and the previous carries);
  the last iteration once more in plain Python, for the values the loop leaves behind.
Output writes happen last, so a runner that declines (returns None, and the original loop runs)
has changed nothing.
"""
from __future__ import annotations

import ast
import functools
import os
import types
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.func import vmap
from torch.fx.experimental.meta_tracer import MetaTracer
from torch.fx.proxy import TraceError

from wavefront.backends.onnx.graphs import LoopExportError
from wavefront.backends.scans.delta.dispatch import delta_rule
from wavefront.backends.scans.linear.dispatch import linear_scan
from wavefront.backends.scans.logspace.chunked import chunked_wkv, maxplus_scan
from wavefront.backends.scans.matrix.dispatch import matrix_scan
from wavefront.time_loops.affine_carry import (
    VALUE_META,
    AffineStep,
    NotAffine,
    analyse_step,
    broadcast_coefficients,
    constant_coefficients,
    scalar_constant,
)
from wavefront.time_loops.delta_state import match_delta_step
from wavefront.time_loops.index_hoist import HoistedReads, hoist_index_reads, read_views
from wavefront.time_loops.logspace_state import (
    LogSpaceStep,
    evaluate,
    match_logspace_step,
)
from wavefront.time_loops.matrix_state import _ancestors, _subgraph, match_matrix_step
from wavefront.time_loops.several_carries import (
    SeveralCarriesStep,
    match_several_carries,
)
from wavefront.time_loops.source import LoopSite


class _StepHolder(nn.Module):
    """Root module for tracing a loop body: the modules the body calls are registered on it,
    so torch.fx records them as calls (and their parameters as attributes)."""


def _compile_body(site: LoopSite, tensor_names: list[str], other_names: list[str], globals_: dict):
    """(step, last) functions of (carry, index, *tensors), closing over the other values: step (to
    trace) returns (new carry, *per-iteration outputs); last (to run) the names' values and outputs."""
    def fn(name, ret, first="self_holder"):
        params = [first] if first else []
        args = ast.arguments([], [ast.arg(a) for a in [*params, *site.carries, site.index, *tensor_names]],
                             None, [], [], None, [])
        return ast.FunctionDef(name, args, [*site.body, ast.Return(ret)], [], None, None)

    def names(xs):
        return ast.Tuple([ast.Name(x, ast.Load()) for x in xs], ast.Load())

    ys = [f"__wf_y{k}" for k in range(len(site.outputs))]
    # "forward": the holder module's method, and the frame torch.fx starts recording stack traces at
    defs = [fn("forward", names([*site.carries, *ys])),
            fn("last", ast.Tuple([names([*site.carries, *site.temps]), names(ys)], ast.Load()), first=None)]
    maker = ast.FunctionDef("make", ast.arguments([], [ast.arg(a) for a in other_names], None, [], [], None, []),
                            [*defs, ast.Return(names(["forward", "last"]))], [], None, None)
    ns: dict = {}
    exec(compile(ast.fix_missing_locations(ast.Module([maker], [])), site.filename or "<wavefront loop body>", "exec"), ns)
    return types.FunctionType(ns["make"].__code__, globals_, "make")


class LoopRunner:
    """Runs the liftable loops of one function; remembers, per site, how its last call ran.

    `runner(k, env, bounds, reverse)` (the loop runs over range(*bounds), reversed if asked)
    returns the values to assign after loop k (carry, temporaries, index), or None to let the
    original loop run. Under torch.export the bounds stay symbolic, and a loop that cannot run as
    a scan raises instead (its Python loop would be unrolled into a fixed length).
    """

    def __init__(self, sites: list[LoopSite], globals_: dict, method: str = "auto"):
        self.sites, self.globals, self.method = sites, globals_, method
        self.status = {k: "not run yet" for k, s in enumerate(sites) if s.liftable}  # the last call, any instance
        self._by_instance = weakref.WeakKeyDictionary()  # module -> {site: status}: one method, many instances
        self._plans: dict = {}  # (site, names, non-tensor values[, shapes]) -> a plan, or why not
        self._shaped: set = set()  # sites whose bodies branch on shapes, traced per shape

    def __call__(self, k: int, env: dict, bounds: tuple, reverse: bool):
        site = self.sites[k]
        # symbolic: under torch.export with a dynamic length (a fixed one leaves the bounds ints)
        symbolic = torch.compiler.is_exporting() and not all(isinstance(b, int) for b in bounds)
        try:
            try:
                values = self._run(site, env, _Steps(bounds, reverse, symbolic))
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                if symbolic or isinstance(e, LoopExportError):
                    raise
                # evaluating it as a scan failed (a body vmap cannot run, inputs the loop itself rejects):
                # nothing was written yet, so the loop runs as written (and raises its own error if any)
                raise _Decline(f"running it as a scan failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
                    from e
        except (NotAffine, _Decline) as e:
            reason = e.reason if isinstance(e, NotAffine) else str(e)
            self._record(k, env, f"left as a loop: {reason}")
            if symbolic:  # at a fixed length the loop is unrolled, as the user's code would be
                raise LoopExportError(f"{site.where()}: the loop over `{site.index}` cannot be exported with a dynamic "
                                      f"length: {reason}. As a Python loop it would be unrolled to the example's "
                                      "length; rewrite it (see explain()) or export at a fixed length") from e
            return None
        values, form = values
        self._record(k, env, f"ran as a {form}")
        return values

    @staticmethod
    def stacked(y: torch.Tensor | None, container: list, dim: int = 0) -> torch.Tensor:
        """What `torch.stack(container, dim)` after the loop gives: the lifted loop's outputs y
        [T, ...] (iteration order) moved to `dim`, in new contiguous storage as torch.stack's; the
        list itself when the original loop ran (y None).

        >>> y = torch.arange(6.).reshape(3, 2)
        >>> torch.equal(LoopRunner.stacked(y, [], 1), torch.stack(list(y), 1))
        True
        """
        if y is None:
            return torch.stack(container, dim)
        if not -y.dim() <= dim < y.dim():
            raise IndexError(f"Dimension out of range (expected to be in range of [{-y.dim()}, {y.dim() - 1}], "
                             f"but got {dim})")
        return y.movedim(0, dim % y.dim()).clone(memory_format=torch.contiguous_format)

    def _record(self, k: int, env: dict, status: str) -> None:
        self.status[k] = status
        owner = env.get("self")
        if isinstance(owner, torch.nn.Module):
            self._by_instance.setdefault(owner, {})[k] = status

    def status_for(self, k: int, module=None) -> str:
        """How site k ran on its last call on `module` ("not run yet" if it never ran there); with
        no module, or a loop that does not read self, the last call on any instance."""
        if module is None or "self" not in self.sites[k].free:
            return self.status[k]
        return self._by_instance.get(module, {}).get(k, "not run yet")

    def preview(self, k: int, module) -> str:
        """Before any call: the verdict for site k, tracing its body with `self` bound to `module`
        and every other name it reads taken as a tensor (exact when that holds; else the first
        call decides)."""
        site = self.sites[k]
        others = ["self"] if "self" in site.free else []
        tensors = [n for n in site.free if n not in others]
        try:
            plan = self._plan(site, tensors, others, [module] * len(others))
        except NotAffine as e:
            return f"left as a loop: {e.reason}"
        except _NeedsShapes:
            return "decided at the first call (the body branches on its tensors' shapes)"
        except _Decline:
            return "decided at the first call (the body reads values that are not tensors)"
        if isinstance(plan, _SeveralCarriesPlan) and plan.max is None:
            return f"{len(site.carries)} carries, each affine in itself: runs as {len(site.carries)} scans"
        if isinstance(plan, _SeveralCarriesPlan):
            return (f"a running max (`{site.carries[plan.max]}`, m' = max(m + a, b)) and values affine in themselves "
                    "once it is known: runs as a max-plus scan and linear scans")
        if isinstance(plan, _LogSpacePlan):
            return ("three carries that are a running-max stabilised (num, den, max): affine in the values they stand "
                    "for (num e^max, den e^max): runs as the stabilised log-space scan")
        if isinstance(plan, _DeltaPlan):
            return ("affine in its carry through the data matrix I - beta k k^T (a delta-rule update read out by "
                    "S^T q): runs as the delta-rule scan")
        if plan.matrix is not None:
            return "affine in its carry, an outer-product update read out by S^T q: runs as a chunked matrix-state scan"
        return "affine in its carry: runs as a scan"

    def _plan(self, site: LoopSite, tensors: list[str], others: list[str], other_values: list,
              metas: dict | None = None, first: tuple | None = None) -> _Plan:
        """Compile the body for these non-tensor values (closed over), prove it affine, and hoist
        its indexed reads. Depends on which names are tensors, on the non-tensor values and the
        tensors' dtypes, never on the tensors' values (nor on the length); with `metas` (the body
        branches on shapes, see _trace) also on their shapes. `first` (the carries, the first
        index, the tensors of a call): the step runs once on them to record every value's dtype
        (a rounding inside the step is then seen whatever way its dtype is written)."""
        step, last = _compile_body(site, tensors, others, self.globals)(*other_values)
        traced = _trace(step, [(n, v) for n, v in zip(others, other_values) if isinstance(v, nn.Module)], metas)
        if first is not None:
            _record_dtypes(traced, first, len(site.carries), metas is not None)
        if len(site.carries) > 1:  # a running-max stabilised pair, a running max and values, or nothing we run
            logspace = match_logspace_step(traced, len(site.carries))
            if logspace is not None:
                return _LogSpacePlan(last, logspace, traced)
            several = match_several_carries(traced, len(site.carries))
            if several is None:
                raise NotAffine(f"{len(site.carries)} carries ({', '.join(site.carries)}) that are not each affine in "
                                "itself (with at most a running max m' = max(m + a, b) beside them, known first)")
            return _several_carries_plan(last, several, site.index)
        try:
            affine = analyse_step(traced)
        except NotAffine:
            delta = match_delta_step(traced)  # affine through a data matrix: the delta rule's own form
            if delta is None:
                raise
            hoist = lambda g: hoist_index_reads(g, site.index) if isinstance(g, fx.GraphModule) else g  # noqa: E731
            return _DeltaPlan(last, hoist(delta.a) if delta.a is not None else None, hoist(delta.k), hoist(delta.v),
                              hoist(delta.q), [(hoist(b), side) for b, side in delta.beta])
        ys = _outputs_graph(traced) if site.outputs else None
        hoist = [hoist_index_reads(g, site.index) if g is not None else None for g in (affine.a, affine.b, ys)]
        reads_previous = ys is not None and len(next(iter(ys.graph.nodes)).users) > 0
        matrix = match_matrix_step(affine.b, ys)
        if matrix is not None:
            matrix = tuple(hoist_index_reads(g, site.index) for g in (matrix.k, matrix.v, matrix.q))
        ab = hoist_index_reads(affine.ab, site.index) if affine.ab is not None else None
        return _Plan(last, affine, *hoist, reads_previous, matrix, ab)

    def _run(self, site: LoopSite, env: dict, steps: _Steps):
        if steps.rng is not None and len(steps.rng) == 0:
            raise _Decline("empty range")
        missing = [n for n in site.free + site.carries if n not in env]
        if missing:
            raise _Decline(f"{', '.join(missing)} not bound before the loop")
        for c in site.carries:
            h0 = env[c]
            if not isinstance(h0, torch.Tensor) or not (h0.is_floating_point() or h0.is_complex()):
                raise _Decline(f"the carry `{c}` does not start as a float tensor")
        h0 = env[site.carries[0]]
        tensors = [n for n in site.free if isinstance(env[n], torch.Tensor)]
        others = [n for n in site.free if n not in tensors]
        key = (id(site), tuple(tensors), tuple(others), tuple(_value_key(env[n]) for n in others))
        key = (*key, tuple(env[n].dtype for n in [*site.carries, *tensors]))
        shaped = id(site) in self._shaped  # its body branches on shapes: a plan per shape
        if shaped:
            key = (*key, _shapes_key(env, [*site.carries, *tensors]))
        if key not in self._plans:
            if len(self._plans) >= 16:  # non-tensor values that change every call (a length): keep a few
                self._plans.pop(next(iter(self._plans)))
            first = None
            if steps.rng is not None:  # (under export the values are symbolic: dtypes as written)
                first = ([env[c] for c in site.carries], steps.rng[0], [env[n] for n in tensors])
            try:
                try:
                    self._plans[key] = self._plan(site, tensors, others, [_snapshot(env[n]) for n in others],
                                                  _metas(env, site, tensors) if shaped else None, first)
                except _NeedsShapes:
                    self._shaped.add(id(site))
                    return self._run(site, env, steps)
            except (NotAffine, _Decline) as e:
                self._plans[key] = e
        plan = self._plans[key]
        if isinstance(plan, Exception):
            raise plan
        idx = steps.index_tensor(h0.device)
        xs = [env[n] for n in tensors]
        if isinstance(plan, _LogSpacePlan):
            return _logspace_scan(plan, site, env, steps, idx, tensors, xs), "stabilised log-space scan"
        if isinstance(plan, _SeveralCarriesPlan):
            return _several_carries_scan(plan, site, env, steps, idx, xs, self.method), _several_form(plan)
        if isinstance(plan, _DeltaPlan):
            return _delta_state_scan(plan, site, env, steps, h0, idx, xs), "delta-rule scan"
        if plan.matrix is not None and steps.rng is not None and h0.dim() >= 2:
            routed = _matrix_state_scan(plan, site, env, steps, h0, idx, xs)
            if routed is not None:
                return routed, "chunked matrix-state scan"
        if steps.rng is not None:
            _check_memory(steps.n, [h0])
        given = h0
        H, h0 = _carry_scan((plan.a, plan.b, plan.ab, plan.affine.dtype), [idx, *xs], (0,) + (None,) * len(xs),
                            steps, h0, self.method)
        if plan.reads_previous and site.outputs:
            _check_first_step_shapes([given], [h0])
        before_last = H[-2] if steps.n > 1 else given  # the carry entering the last iteration
        values_after, _ = plan.last(before_last, steps.last, *xs)  # what the loop leaves in its names, exactly
        stacked = []
        if site.outputs:
            H_prev = torch.cat([h0.unsqueeze(0), H[:-1]]) if plan.reads_previous else H  # (else unused)
            Y = _over_steps(plan.ys, [H_prev, H, idx, *xs], (0, 0, 0) + (None,) * len(xs), steps)
            stacked = _stack_or_write(site, env, Y, idx)
        return (*values_after, steps.last, *stacked), "scan"


def _carry_scan(coefficients: tuple, args: list, in_dims: tuple, steps: "_Steps", h0: torch.Tensor, method: str):
    """(every step's carry [n, ...], the initial carry as the scan took it) of h = a h + b, with
    coefficients (a, b, ab, dtype): HoistedReads of `args` (None: a = 1, b = 0; ab: both from one
    graph) and the dtype the loop converts its carry to each step (None: the one a and b promote to)."""
    a, b, ab, declared = coefficients
    ca, cb = (scalar_constant(g.gm) if g is not None else None for g in (a, b))
    if ca is None and cb is None and ab is not None:  # one pass: what a and b share is computed once
        A, B = _over_steps(ab, args, in_dims, steps)
    else:
        A, B = (_over_steps(g, args, in_dims, steps) if c is None else None for g, c in ((a, ca), (b, cb)))
    A, B = constant_coefficients(A, B, ca, cb, h0, steps.n, declared)
    A, B = broadcast_coefficients(A, B, h0, steps.n)
    dtype = declared or torch.promote_types(torch.promote_types(A.dtype, B.dtype), h0.dtype)
    h0 = h0.to(dtype).expand(A.shape[1:])  # the carry may widen on its first step (h = a * 0-dim + b)
    return linear_scan(A.to(dtype).contiguous(), B.to(dtype).contiguous(), h0, dim=0, method=method), h0


@dataclass
class _SeveralCarriesPlan:
    last: object  # as _Plan.last
    max: int | None  # the running max carry's position, None without one
    lw: HoistedReads | float | None  # m' = max(m + lw, lk): of (index, *tensors)
    lk: HoistedReads | float | None
    others: list  # (position, (a, b, ab) HoistedReads of ([previous max,] index, *tensors), and its dtype)
    ys: HoistedReads | None  # of (*previous carries, *new carries, index, *tensors)
    max_dtype: torch.dtype | None  # the dtype the loop converts its max to, if it does


def _several_carries_plan(last, step: SeveralCarriesStep, index: str) -> _SeveralCarriesPlan:
    def hoist(g):
        return hoist_index_reads(g, index) if isinstance(g, fx.GraphModule) else g
    others = [(k, (*(hoist(g) for g in (s.a, s.b, s.ab)), s.dtype)) for k, s in step.others]
    return _SeveralCarriesPlan(last, step.max, hoist(step.lw), hoist(step.lk), others, hoist(step.ys), step.max_dtype)


def _several_form(plan: _SeveralCarriesPlan) -> str:
    return "running-max scan" if plan.max is not None else f"scan of {len(plan.others)} carries"


def _several_carries_scan(plan: _SeveralCarriesPlan, site: LoopSite, env: dict, steps: "_Steps", idx, xs,
                          method: str):
    """The running max m (if any) for every step by a max-plus scan, each other carry by a
    linear scan of its update at the known maxima, the outputs from all steps' carries at once,
    the last step once more in plain Python for the values the loop leaves (several_carries.py)."""
    if steps.rng is None:
        raise _Decline("a loop of several carries does not export with a dynamic length yet")
    n = steps.n
    h0s = [env[c] for c in site.carries]
    _check_memory(n, h0s)
    everything, firsts = [None] * len(h0s), list(h0s)  # every step's carries [n, ...]; the first as scanned
    maxima = []
    if plan.max is not None:
        M0, M = _running_max(plan, h0s[plan.max], idx, xs, steps)
        firsts[plan.max], everything[plan.max] = M0, M
        maxima = [torch.cat([M0.unsqueeze(0), M[:-1]])]  # the max entering each step
    for k, coefficients in plan.others:
        everything[k], firsts[k] = _carry_scan(coefficients, [*maxima, idx, *xs], (0,) * (len(maxima) + 1)
                                               + (None,) * len(xs), steps, h0s[k], method)
    previous = [torch.cat([h.unsqueeze(0), H[:-1]]) for h, H in zip(firsts, everything)]
    entering_last = [P[-1] for P in previous] if n > 1 else h0s  # one step: the carries as the loop got them
    values_after, _ = plan.last(*entering_last, steps.last, *xs)  # exactly what the loop leaves
    stacked = []
    if site.outputs:
        read = [p for p in plan.ys.gm.graph.nodes if p.op == "placeholder"][:len(h0s)]
        _check_first_step_shapes([h for h, p in zip(h0s, read) if p.users],
                                 [f for f, p in zip(firsts, read) if p.users])
        Y = _over_steps(plan.ys, [*previous, *everything, idx, *xs], (0,) * (2 * len(h0s) + 1) + (None,) * len(xs),
                        steps)
        stacked = _stack_or_write(site, env, Y, idx)
    return (*values_after, steps.last, *stacked)


def _running_max(plan: _SeveralCarriesPlan, m0: torch.Tensor, idx, xs, steps: "_Steps"):
    """(the initial max as scanned, the max after every step [n, ...]) of m' = max(m + lw, lk)."""
    n, in_dims = steps.n, (0,) + (None,) * len(xs)
    parts = [_over_steps(g, [idx, *xs], in_dims, steps) if isinstance(g, HoistedReads) else g
             for g in (plan.lw, plan.lk)]
    dtype = plan.max_dtype or functools.reduce(torch.promote_types, [p.dtype for p in parts
                                                                     if isinstance(p, torch.Tensor)], m0.dtype)
    if not dtype.is_floating_point:
        raise _Decline("its running max is not real-valued")
    LW, LK = (p if isinstance(p, torch.Tensor) else torch.full((n,), p, dtype=dtype, device=m0.device)
              for p in parts)  # a constant in the dtype the max is kept in (a Python float until then)
    try:
        shape = torch.broadcast_shapes(m0.shape, LW.shape[1:], LK.shape[1:])
    except RuntimeError as e:
        raise _Decline(f"its maxima do not broadcast together ({e})") from e

    def per_step(x):  # [n, ...] with its own dims right-aligned to the max's
        return x.reshape(n, *([1] * (len(shape) - (x.dim() - 1))), *x.shape[1:]).to(dtype).expand(n, *shape)
    M0, LW, LK = m0.to(dtype).expand(shape), per_step(LW), per_step(LK)
    M = maxplus_scan(LW, LK, M0, 0)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (M0, LW, LK)):
        if bool((torch.cat([M0.unsqueeze(0), M[:-1]]) + LW == LK).any()):
            # a tie: the loop's max splits its gradient there, which a scan composing maxima in another
            # order does not reproduce; the max alone (a small tensor) then runs step by step, as written
            steps_m, m = [], M0
            for t in range(n):
                m = torch.maximum(m + LW[t], LK[t])
                steps_m.append(m)
            M = torch.stack(steps_m)
    return M0, M


def _memory_budget() -> float:
    return float(os.environ.get("WAVEFRONT_SCAN_MEMORY_GB", "4")) * 2**30


def _check_memory(n: int, carries: list) -> None:
    """Declines when a scan would hold more than the budget: a, b and every step's carries, at least."""
    need = 3 * n * sum(h.numel() * h.element_size() for h in carries)
    if need > _memory_budget():
        raise _Decline(f"running it as a scan would hold {need / 2**30:.1f} GiB of per-step coefficients and "
                       f"states (over WAVEFRONT_SCAN_MEMORY_GB={_memory_budget() / 2**30:g})")


def _stack_or_write(site: LoopSite, env: dict, Y, idx) -> list:
    """Every step's outputs Y (one [n, ...] per output of the site): the stacks of lists only ever
    stacked after the loop (returned, no T tensors made), the others written into their containers,
    all checked first and written last, so that a write that cannot happen changes nothing."""
    writes, stacked = [], []
    for o, y in zip(site.outputs, Y):
        if o.stacked:
            stacked.append(y)
        else:
            writes.append(_writer(o, env[o.container], y, idx))
    for write in writes:  # only now change what the caller can see
        write()
    return stacked


def _value_key(v):
    """Plans are reused for equal hashable values (a float by its repr: 0.0 and -0.0 differ), plain
    dicts and lists of equal contents (a function's `**kwargs` is a new dict every call), a module
    whose train/eval flags and plain attributes are as they were (a body reads them as
    constants), and the very same object otherwise."""
    if type(v) is dict:
        return ("dict", tuple((k, _value_key(x)) for k, x in v.items()))
    if type(v) is list:
        return ("list", tuple(_value_key(x) for x in v))
    if isinstance(v, nn.Module):
        return ("module", id(v), tuple((m.training, tuple((k, _value_key(x)) for k, x in vars(m).items()
                                                           if type(x) in _PLAIN)) for m in v.modules()))
    if type(v) is float:
        return (float, repr(v))
    try:
        hash(v)
        return (type(v), v)
    except TypeError:
        return ("id", id(v))


_PLAIN = (bool, int, float, str, type(None))  # module attributes a traced body bakes in


def _snapshot(v):
    """What a plan closes over: a copy of a plain dict or list, nested ones too (its key is its
    contents now, so a later change to the caller's object must not reach the plan), anything
    else as it is."""
    if type(v) is dict:
        return {k: _snapshot(x) for k, x in v.items()}
    return [_snapshot(x) for x in v] if type(v) is list else v


@dataclass
class _Plan:
    last: object  # the body as plain Python: (carry, index, *tensors) -> (names' values, ys)
    affine: AffineStep
    a: HoistedReads | None  # a(i, *tensors), b(i, *tensors); None: a = 1, b = 0
    b: HoistedReads | None
    ys: HoistedReads | None  # ys(previous carry, new carry, i, *tensors); None: no outputs
    reads_previous: bool  # do the ys read the previous carry (else only the new one)?
    matrix: tuple | None = None  # (k, v, q) HoistedReads of a matrix-state loop (wavefront/time_loops/matrix_state.py)
    ab: HoistedReads | None = None  # a and b from one graph (both non-constant)


@dataclass
class _LogSpacePlan:
    last: object  # as _Plan.last
    step: LogSpaceStep
    traced: fx.GraphModule  # the step the symbols' nodes belong to


def _logspace_scan(plan: _LogSpacePlan, site: LoopSite, env: dict, steps: "_Steps", idx, tensors: list, xs):
    """The stabilised triple loop as the chunked WKV scan over all but the last step, then the
    last step in plain Python (like _matrix_state_scan)."""
    if steps.rng is None:
        raise _Decline("a stabilised log-space loop does not export with a dynamic length yet")
    lw_, lk_, x_, lu_ = (plan.step.lw, plan.step.lk, plan.step.x, plan.step.lu)
    placeholders = [n for n in plan.traced.graph.nodes if n.op == "placeholder"]
    n_carries, index_node = len(site.carries), placeholders[len(site.carries)]
    by_node = dict(zip(placeholders[n_carries + 1:], xs))
    try:  # the carries as the loop will hold them after its first step (a scalar initial max broadcasts)
        state = list(torch.broadcast_tensors(*(env[site.carries[k]] for k in (plan.step.num, plan.step.den,
                                                                              plan.step.max))))
    except RuntimeError as e:
        raise _Decline(f"its carries do not broadcast together ({e})") from e
    if state[0].dim() < 1:
        raise _Decline("its carries are scalars (the WKV scan runs per channel)")
    lead, ch, n = tuple(state[0].shape[:-1]), state[0].shape[-1], steps.n
    per_step, values = set(), {}
    for sym, node in plan.step.reads.items():
        if node is index_node or (index_node in _ancestors(node)):
            per_step.add(sym)
            g = hoist_index_reads(_subgraph(plan.traced, node, drop=n_carries), site.index)
            v = _over_steps(g, [idx, *xs], (0,) + (None,) * len(xs), steps)
            if v.dim() - 1 > state[0].dim():
                raise _Decline(f"a per-step value of shape {tuple(v.shape[1:])} is larger than the carries")
            # [n, ...] with its own dims right-aligned to the carries', the step axis in front of them all
            values[sym] = v.reshape(n, *([1] * (state[0].dim() - (v.dim() - 1))), *v.shape[1:])
        elif node.op == "placeholder":
            values[sym] = by_node[node]
        elif node.op == "get_attr":
            values[sym] = functools.reduce(getattr, node.target.split("."), plan.traced)
        else:
            values[sym] = _subgraph(plan.traced, node, drop=n_carries)(idx[0], *xs)
    if (lw_.free_symbols | lu_.free_symbols) & per_step:
        raise _Decline("its decay or bonus changes from step to step (the WKV scan takes them per channel)")
    try:
        rate = (-torch.as_tensor(evaluate(lw_, values))).expand(ch)
        bonus = torch.as_tensor(evaluate(lu_, values)).expand(ch)
        K, V = (torch.as_tensor(evaluate(e, values)).expand(n, *lead, ch).movedim(0, -2) for e in (lk_, x_))
        O = None
        if n > 1:
            O, (num, den, mx) = chunked_wkv(None, bonus, K[..., :-1, :], V[..., :-1, :], tuple(state),
                                            decay_rate=rate)
            state = [num.to(state[0].dtype), den.to(state[1].dtype), mx.to(state[2].dtype)]
    except (RuntimeError, ValueError, TypeError) as e:
        raise _Decline(f"its parts do not broadcast to the carries {tuple(state[0].shape)} ({e})") from e
    carries = [None] * 3
    for k, role in enumerate((plan.step.num, plan.step.den, plan.step.max)):
        carries[role] = state[k]
    return _last_step_and_writes(plan, site, env, steps, idx, xs, carries, O)


@dataclass
class _DeltaPlan:
    last: object  # as _Plan.last
    a: HoistedReads | None  # the decay (None: 1)
    k: HoistedReads
    v: HoistedReads
    q: HoistedReads
    beta: list  # HoistedReads or numbers, multiplied


def _decay_per_row(A: torch.Tensor, h0: torch.Tensor, n: int) -> torch.Tensor | None:
    """A per-step decay [n, ...] of a matrix state h0 [lead..., dk, dv] that scales it by one value
    per head ([lead..., n]) or per key dim ([lead..., n, dk]); None for any other shape."""
    lead, dk = tuple(h0.shape[:-2]), h0.shape[-2]
    shape = (1,) * (h0.dim() - (A.dim() - 1)) + tuple(A.shape[1:])
    if len(shape) != h0.dim() or shape[-1] != 1 or shape[-2] not in (1, dk):
        return None
    A = A.reshape(n, *shape)[..., 0]  # [n, ..., 1 or dk]
    try:
        return A[..., 0].movedim(0, -1).expand(*lead, n) if shape[-2] == 1 else A.movedim(0, -2).expand(*lead, n, dk)
    except RuntimeError:
        return None


def _per_head(x: torch.Tensor, n: int, lead: tuple, state_dims: int, what: str) -> torch.Tensor:
    """A per-step factor [n, ...] that broadcasts to the state as one value per head (trailing
    state dims of size 1), as [lead..., n]."""
    shape = (1,) * (len(lead) + state_dims - (x.dim() - 1)) + tuple(x.shape[1:])
    if len(shape) != len(lead) + state_dims or any(d != 1 for d in shape[len(lead):]):
        raise _Decline(f"its {what} of shape {tuple(x.shape[1:])} is not one value per head of a "
                       f"{state_dims}-dim state")
    return x.reshape(n, *shape[:len(lead)]).movedim(0, -1).expand(*lead, n)


def _delta_state_scan(plan: _DeltaPlan, site: LoopSite, env: dict, steps: "_Steps", h0, idx, xs):
    """S = a S; S = S + beta k (v - S^T k)^T with the output S^T q, as the delta-rule scan
    over all but the last step, then the last step in plain Python for the values the loop
    leaves (like _matrix_state_scan)."""
    if steps.rng is None:
        raise _Decline("a delta-rule loop does not export with a dynamic length yet")
    if h0.dim() < 2:
        raise _Decline("the delta-rule state must be a matrix [..., dk, dv]")
    n, in_dims = steps.n, (0,) + (None,) * len(xs)
    lead, (dk, dv) = tuple(h0.shape[:-2]), tuple(h0.shape[-2:])
    K, V, Q = (_over_steps(g, [idx, *xs], in_dims, steps) for g in (plan.k, plan.v, plan.q))
    beta = torch.ones(n, dtype=h0.dtype, device=h0.device)
    try:
        for b, side in plan.beta:
            if not isinstance(b, HoistedReads):
                beta = beta * b
                continue
            f = _over_steps(b, [idx, *xs], in_dims, steps)
            f = f.unsqueeze(-1) if side == "key" else f.unsqueeze(-2) if side == "value" else f  # as it multiplies
            beta = beta.reshape(n, *([1] * (f.dim() - beta.dim())), *beta.shape[1:]) * f \
                if f.dim() >= beta.dim() else beta * f.reshape(n, *([1] * (beta.dim() - f.dim())), *f.shape[1:])
    except RuntimeError as e:
        raise _Decline(f"its beta factors do not broadcast together ({e})") from e
    beta = _per_head(beta, n, lead, 2, "beta")
    g = None
    if plan.a is not None:
        A = _over_steps(plan.a, [idx, *xs], in_dims, steps)
        if not A.is_floating_point() or bool((A <= 0).any()):
            raise _Decline("its decay is not positive everywhere (the delta-rule scan takes its logarithm)")
        A = _decay_per_row(A, h0, n)  # one gate per head, or per key dim (KDA)
        if A is None:
            raise _Decline("its decay is neither one value per head nor one per key dim of the state")
        g = torch.log(A)
    dtype = h0.dtype
    for t in (K, V, Q, beta, g):
        dtype = torch.promote_types(dtype, t.dtype) if t is not None else dtype
    if not dtype.is_floating_point:
        raise _Decline("the delta-rule scan is real-valued")
    try:
        K, Q = (x.to(dtype).movedim(0, -2).expand(*lead, n, dk) for x in (K, Q))
        V = V.to(dtype).movedim(0, -2).expand(*lead, n, dv)
    except RuntimeError as e:
        raise _Decline(f"its key, value or query does not broadcast to the state {tuple(h0.shape)}") from e
    S, O = h0.to(dtype), None
    if n > 1:
        g = None if g is None else (g[..., :-1, :] if g.dim() == h0.dim() else g[..., :-1]).to(dtype)
        O, S = delta_rule(Q[..., :-1, :], K[..., :-1, :], V[..., :-1, :], beta[..., :-1].to(dtype), g, S)
    return _last_step_and_writes(plan, site, env, steps, idx, xs, [S], O)


def _last_step_and_writes(plan, site: LoopSite, env: dict, steps: "_Steps", idx, xs, carries: list, O):
    """After a state scan over all but the last step (outputs O [..., n - 1, d] or None, the
    carries entering the last step, in the site's order): the last step in plain Python for the
    values the loop leaves, then every step's output written (or handed over stacked)."""
    values_after, ys_last = plan.last(*carries, steps.last, *xs)
    Y = torch.cat([y.to(ys_last[0].dtype) for y in ([] if O is None else [O.movedim(-2, 0)])
                   + [ys_last[0].unsqueeze(0)]])
    o = site.outputs[0]
    if o.stacked:
        return (*values_after, steps.last, Y)
    _writer(o, env[o.container], Y, idx)()
    return (*values_after, steps.last)


def _matrix_state_scan(plan: _Plan, site: LoopSite, env: dict, steps: "_Steps", h0, idx, xs):
    """S = a S + k v^T with the output S^T q, as the chunked matrix scan over all but the last
    step (no [T, ..., dk, dv] states held), then the last step in plain Python for the values
    the loop leaves. None (the generic scan runs) when a's shape is not a scalar or per-key-dim
    decay, or the parts do not broadcast to the state."""
    n, in_dims = steps.n, (0,) + (None,) * len(xs)
    lead, (dk, dv) = tuple(h0.shape[:-2]), tuple(h0.shape[-2:])
    K, V, Q = (_over_steps(g, [idx, *xs], in_dims, steps) for g in plan.matrix)
    A = _over_steps(plan.a, [idx, *xs], in_dims, steps)
    if A is not None:
        A = _decay_per_row(A, h0, n)
        if A is None:
            return None
    dtype = h0.dtype
    for t in (A, K, V, Q):
        dtype = torch.promote_types(dtype, t.dtype) if t is not None else dtype
    if not dtype.is_floating_point:  # the chunked kernel is real-valued: complex states take the generic scan
        return None
    try:  # [n, ..., d] -> [lead..., n, d]
        K, Q = (x.to(dtype).movedim(0, -2).expand(*lead, n, dk) for x in (K, Q))
        V = V.to(dtype).movedim(0, -2).expand(*lead, n, dv)
        A = None if A is None else A.to(dtype)
    except RuntimeError:
        return None
    S, O = h0.to(dtype), None
    if n > 1:
        decay = None if A is None else (A[..., :-1, :] if A.dim() == h0.dim() else A[..., :-1])
        O, S = matrix_scan(Q[..., :-1, :], K[..., :-1, :], V[..., :-1, :], decay, S)
    return _last_step_and_writes(plan, site, env, steps, idx, xs, [S], O)


def _outputs_graph(traced: fx.GraphModule) -> fx.GraphModule:
    """The per-iteration outputs of a traced step (outputs: new carry, *ys) as a graph of
    (previous carry, new carry, index, *tensors): the new carry comes from the scan instead of
    being computed again."""
    graph, env = fx.Graph(), {}
    out = next(n for n in traced.graph.nodes if n.op == "output")
    new_carry, *ys = out.args[0]
    for n in traced.graph.nodes:
        if n is out:
            graph.output(tuple(fx.node.map_arg(y, lambda a: env[a]) for y in ys))
        elif n is new_carry:
            continue  # bound below, right after the previous carry
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
            if n.op == "placeholder" and len(env) == 1:
                env[new_carry] = graph.placeholder("wf_new_carry")
    gm = fx.GraphModule(traced, graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _trace(fn, modules, metas: dict | None = None) -> fx.GraphModule:
    """Trace `fn(self_holder, ...)` with the modules it calls registered on the holder: symbolic
    (one graph for every shape); with `metas` (input name -> a tensor of its shape and dtype), by
    torch.fx's meta tracer, which answers shape questions (`if q.shape != k.shape: raise`,
    `b, h, d = q.shape`) for these shapes. Raises _NeedsShapes when only the latter can."""
    holder = type("WavefrontLoopStep", (_StepHolder,), {"forward": fn})()
    for n, m in modules:
        holder.add_module(n, m)
    tracer = fx.Tracer() if metas is None else MetaTracer()
    tracer.record_stack_traces = True  # so a non-affine op is reported with the user's line
    try:
        with warnings.catch_warnings():  # the meta tracer warns for every op it cannot give a shape
            warnings.simplefilter("ignore")
            graph = tracer.trace(holder) if metas is None else tracer.trace(holder, meta_args=metas)
        return fx.GraphModule(holder, graph)
    except Exception as e:  # the body does something fx cannot follow
        if isinstance(e, TraceError) and metas is None and not torch.compiler.is_exporting():
            raise _NeedsShapes(str(e)) from e  # a Python decision on a traced value: a shape, if anything
        raise _Decline(f"the body could not be traced ({type(e).__name__}: {e})") from e


def _check_first_step_shapes(given: list, scanned: list) -> None:
    """Outputs that read the carries before each step see the scan's carries, broadcast to the
    shape they take after the first step: a carry that widens then would be read widened."""
    for g, s in zip(given, scanned):
        if tuple(g.shape) != tuple(s.shape):
            raise _Decline(f"a carry widens from {tuple(g.shape)} to {tuple(s.shape)} on the first step and the "
                           "outputs read it before each step")


class _ValueRecorder(fx.Interpreter):
    """Runs a graph and records each tensor value's dtype and shape in node.meta[VALUE_META] (like
    torch.fx's ShapeProp, which prints a traceback when a node fails)."""

    def run_node(self, n):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[VALUE_META] = types.SimpleNamespace(dtype=result.dtype, shape=tuple(result.shape))
        return result


def _record_dtypes(traced: fx.GraphModule, first: tuple, n_carries: int, shaped: bool) -> None:
    """Run the step once on a call's values (carries cloned: a body may update them in place; the
    modules' buffers and the RNG put back after) and record every node's dtype and shape
    (node.meta[VALUE_META]). A body traced for its shapes must keep its carries' shapes and dtypes:
    a carry widened on its first step would take another branch from the second step on."""
    carries, index, xs = first
    buffers = [(b, b.clone()) for b in traced.buffers()]  # a module in the body may update its own (BatchNorm)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # nor may it draw from the caller's RNG
            _ValueRecorder(traced).run(*(c.clone() for c in carries), torch.tensor(index), *xs)
    except Exception:  # noqa: BLE001 - a body that does not run on its own: dtypes as written
        return
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    if shaped:
        out = next(n for n in traced.graph.nodes if n.op == "output").args[0]
        for c, node in zip(carries, out[:n_carries]):
            meta = node.meta.get(VALUE_META) if isinstance(node, fx.Node) else None
            if meta is None or tuple(meta.shape) != tuple(c.shape) or meta.dtype != c.dtype:
                raise _Decline("its body branches on shapes and a carry changes its shape or dtype on the first step "
                               f"({tuple(c.shape)} {c.dtype} -> {tuple(getattr(meta, 'shape', ()))} "
                               f"{getattr(meta, 'dtype', '?')}): it was traced for the first step's only")


def _metas(env: dict, site: LoopSite, tensors: list[str]) -> dict:
    """The meta tracer's inputs: the carries and tensors as meta tensors of their shapes and
    dtypes, the index as a 0-dim integer (a real one: indexing a meta tensor by it has a shape)."""
    out = {n: env[n].to("meta") for n in [*site.carries, *tensors]}
    out[site.index] = torch.zeros((), dtype=torch.long)
    return out


def _shapes_key(env: dict, names: list[str]) -> tuple:
    return tuple(tuple(env[n].shape) for n in names)  # (their dtypes are in every plan's key)


def _over_steps(h: HoistedReads | None, args: list, in_dims: tuple, steps: "_Steps"):
    """Evaluate a per-step graph for every step at once (vmap over dim 0 of the batched args),
    its indexed reads fed as views where the range allows."""
    if h is None:
        return None
    views = steps.views(h.reads, args)
    if views is not None:
        return vmap(h.gm, in_dims=in_dims + (0,) * len(views))(*args, *views)
    if steps.rng is None:  # exporting: a gather by a symbolic index does not trace under vmap
        raise _Decline("its body uses the loop index other than as a plain read `x[:, t]`, which does not export")
    return vmap(h.original, in_dims=in_dims)(*args)  # gathers: the original graph, unhoisted


class _Steps:
    """The loop's index values: a Python range when the bounds are numbers; under torch.export,
    symbolic bounds turned into tensors and sizes without ever becoming ints (which would fix T)."""

    def __init__(self, bounds: tuple, reverse: bool, symbolic: bool):
        self.bounds, self.reverse = bounds, reverse
        self.start, self.stop, self.step = (0, bounds[0], 1) if len(bounds) == 1 else (*bounds, 1)[:3]
        self.rng = None
        if not symbolic:
            rng = range(*bounds)
            self.rng = rng[::-1] if reverse else rng
            self.n, self.last = len(self.rng), (self.rng[-1] if len(self.rng) else None)
        else:
            start, stop, step = self.start, self.stop, self.step
            if not isinstance(step, int) or step <= 0:
                raise _Decline("under export, only ranges with a positive constant step are supported")
            self.n = (stop - start + step - 1) // step
            first, final = start, start + (self.n - 1) * step
            self.last = first if reverse else final

    def views(self, reads, args) -> list | None:
        """Views feeding hoisted reads; symbolic bounds are taken to lie within the read tensors
        (as they must for the loop itself to run) and to start at a non-negative constant."""
        if self.rng is not None:
            return read_views(reads, args, self.rng)
        if not (isinstance(self.start, int) and self.start >= 0):
            return None
        out = []
        for pos, dim in reads:
            v = args[pos].movedim(dim, 0)[self.start:self.stop:self.step]
            out.append(v.flip(0) if self.reverse else v)
        return out

    def index_tensor(self, device) -> torch.Tensor:
        if self.rng is not None:
            return torch.arange(self.rng.start, self.rng.stop, self.rng.step, device=device)
        idx = torch.arange(*self.bounds, device=device)
        return idx.flip(0) if self.reverse else idx


class _Decline(Exception):
    """The runner will not lift this call of the loop; the original loop runs instead."""


class _NeedsShapes(_Decline):
    """The body makes Python decisions on its values' shapes: trace it for the shapes of a call."""


def _writer(o, container, y: torch.Tensor, idx: torch.Tensor):
    """A function doing all of a loop's writes `container[:, i] = y_i` (or appends) at once;
    checked here, so that a write that cannot happen declines before anything changed."""
    if o.kind == "append":
        if torch.compiler.is_exporting():
            raise _Decline(f"its outputs are appended to the list `{o.container}`, whose length an export fixes; "
                           f"write them into a tensor instead (`{o.container}[:, t] = ...`)")
        if not isinstance(container, list):
            raise _Decline(f"`{o.container}` is not a list")
        return lambda: container.extend(y.unbind(0))
    if not isinstance(container, torch.Tensor):
        raise _Decline(f"`{o.container}` is not a tensor")
    target = container.movedim(o.position, 0)
    per_write = target.dim() - 1
    if y.dim() - 1 > per_write:
        raise _Decline(f"a value of shape {tuple(y.shape[1:])} does not fit `{o.container}` writes")
    y = y.reshape(y.shape[0], *([1] * (per_write - (y.dim() - 1))), *y.shape[1:])

    def write():
        target[idx] = y
    return write


__all__ = ["LoopRunner", "LoopExportError"]
