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
    T = xs.shape[0]
    shape = (T, *init.shape)
    a = plan.affine.a
    b = plan.affine.b
    A = vmap(a)(xs).expand(shape) if a is not None else torch.ones(shape, dtype=init.dtype, device=init.device)
    B = vmap(b)(xs).expand(shape) if b is not None else torch.zeros(shape, dtype=init.dtype, device=init.device)
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), init.dtype)
    return linear_scan(A.to(dtype).contiguous(), B.to(dtype).contiguous(), init.to(dtype), dim=0, method=method)
