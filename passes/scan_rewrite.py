"""Run a recurrence step over time as a scan when it is affine in its carry.

scan_loop(step, init, xs) is the rewrite the scan pass applies to a loop
`for t: h = step(h, xs[t])`: it proves the step affine (affine_carry.py), evaluates a(x_t) and
b(x_t) for every t at once with torch.func.vmap, and hands (a, b) to linear_scan (native
kernel, chunked torch or loop, by cost). A step that is not affine runs as the plain loop, and
`ScanPlan.reason` says why.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.func import vmap

from wavefront.backends.linear_scan import linear_scan

from .affine_carry import AffineStep, NotAffine, analyse_step


@dataclass
class ScanPlan:
    """How a step will run: as a scan (affine is set) or as the loop (reason says why)."""

    affine: AffineStep | None
    reason: str = ""

    @property
    def parallel(self) -> bool:
        return self.affine is not None


def plan_step(step) -> ScanPlan:
    """Analyse `step(carry, x) -> new carry` once; reuse the plan for every call."""
    try:
        return ScanPlan(analyse_step(step))
    except NotAffine as e:
        return ScanPlan(None, e.reason)


def loop_reference(step, init: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """The plain loop: all carries, stacked on dim 0."""
    h, out = init, []
    for t in range(xs.shape[0]):
        h = step(h, xs[t])
        out.append(h)
    return torch.stack(out)


def coefficients(step: AffineStep, args: list, in_dims: tuple, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a(x_t) and b(x_t) for every step t at once (vmap over the time dim of `args`), expanded
    to [T, *shape] (the carry's shape broadcast with theirs); a missing a is 1, a missing b is 0."""
    T = next(x.shape[0] for x, d in zip(args, in_dims) if d == 0)
    ca, cb = scalar_constant(step.a), scalar_constant(step.b)
    A = vmap(step.a, in_dims=in_dims)(*args) if step.a is not None and ca is None else None
    B = vmap(step.b, in_dims=in_dims)(*args) if step.b is not None and cb is None else None
    A, B = constant_coefficients(A, B, ca, cb, h0, T)
    return broadcast_coefficients(A, B, h0, T)


def scalar_constant(gm) -> int | float | complex | None:
    """The Python number a coefficient graph returns whatever its inputs (`h = 0.9 * h + x[t]`:
    a = 0.9), else None. vmap cannot map such a graph: it returns no tensor."""
    if not isinstance(gm, fx.GraphModule):
        return None
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    return out if isinstance(out, (int, float, complex)) and not isinstance(out, bool) else None


def constant_coefficients(A, B, ca, cb, h0: torch.Tensor, T: int):
    """A and B with the constant ones (ca, cb: Python numbers, or None) made [T, 1, ...] tensors
    of the dtype the loop computes in: a Python number takes the tensors' dtype (`0.9 * h` of a
    float32 h stays float32), widening only across kinds (a complex number and a real carry).

    >>> A, B = constant_coefficients(None, None, 0.5, None, torch.zeros(2, dtype=torch.float32), 3)
    >>> A.shape, A.dtype, B
    (torch.Size([3, 1]), torch.float32, None)
    """
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


def scan_loop(step, init: torch.Tensor, xs: torch.Tensor, plan: ScanPlan | None = None,
              method: str = "auto") -> torch.Tensor:
    """All carries of `for t: h = step(h, xs[t])` (time on dim 0 of xs), stacked on dim 0.

    >>> step = lambda h, x: torch.sigmoid(x) * h + x
    >>> xs, h0 = torch.randn(100, 3), torch.zeros(3)
    >>> torch.allclose(scan_loop(step, h0, xs), loop_reference(step, h0, xs), atol=1e-6)
    True
    """
    plan = plan if plan is not None else plan_step(step)
    if not plan.parallel:
        return loop_reference(step, init, xs)
    A, B = coefficients(plan.affine, [xs], (0,), init)
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), init.dtype)
    return linear_scan(A.to(dtype).contiguous(), B.to(dtype).contiguous(), init.to(dtype).expand(A.shape[1:]),
                       dim=0, method=method)


class AffineScan(nn.Module):
    """Replaces torch's scan HOP for a combine function affine in its carry. Same inputs (init,
    xs, additional inputs) and outputs ([final carry, ys...]) as the node it replaces: the
    carries come from linear_scan, then the combine graph runs once, vmapped over all steps
    with the now-known previous carries, to produce the ys exactly as the loop would."""

    def __init__(self, combine: fx.GraphModule, step: AffineStep, n_xs: int, n_extra: int):
        super().__init__()
        self.combine, self.step, self.n_xs, self.n_extra = combine, step, n_xs, n_extra

    def forward(self, init, xs, extra):
        h0, xs, extra = init[0], list(xs), list(extra)
        dims = (0,) * self.n_xs + (None,) * self.n_extra
        A, B = coefficients(self.step, [*xs, *extra], dims, h0)
        h0 = h0.expand(A.shape[1:])
        H = linear_scan(A.to(h0.dtype).contiguous(), B.to(h0.dtype).contiguous(), h0, dim=0)
        H_prev = torch.cat([h0.unsqueeze(0), H[:-1]])
        outs = vmap(self.combine, in_dims=(0, *dims))(H_prev, *xs, *extra)
        return [H[-1], *outs[1:]]


def parallelize_scans(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """Replace every torch scan HOP in `gm` whose combine function is affine in its (single)
    carry by an AffineScan; leave the others, saying why. Returns (gm, one line per scan)."""
    report = []
    for n in list(gm.graph.nodes):
        if not (n.op == "call_function" and n.target is torch.ops.higher_order.scan):
            continue
        combine_node, init, xs, extra = n.args
        combine = getattr(gm, combine_node.target)
        if len(init) != 1:
            report.append(f"{n.name}: {len(init)} carries: left as a loop (one carry is supported)")
            continue
        try:
            step = analyse_step(combine)
        except NotAffine as e:
            report.append(f"{n.name}: left as a loop: {e.reason}")
            continue
        name = f"wavefront_{n.name}"
        gm.add_submodule(name, AffineScan(combine, step, len(xs), len(extra)))
        with gm.graph.inserting_before(n):
            new = gm.graph.call_module(name, (list(init), list(xs), tuple(extra)))
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        report.append(f"{n.name}: affine in its carry: runs as a parallel scan")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm, report


def parallelize_exported(model: nn.Module, example_inputs: tuple, dynamic_shapes=None) -> tuple[fx.GraphModule, list[str]]:
    """torch.export `model` (give the time dim as dynamic so the length is not frozen), then
    parallelize its scans. The result runs at any length the export allows."""
    torch._dynamo.reset()
    ep = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    return parallelize_scans(ep.module())
