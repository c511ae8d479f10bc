"""The plain reference for first-order linear recurrences: h_t = a_t * h_{t-1} + b_t, one step at a time."""
from __future__ import annotations

import torch
from wavefront.backends.scans.shapes import time_dim


def linear_scan_reference(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, dim: int = 1,
                          reverse: bool = False) -> torch.Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t along `dim` (h_{-1} = h0, zero by default), one
    step at a time. reverse=True runs from the last step: h_t = a_t * h_{t+1} + b_t.

    >>> a = torch.full((1, 3), 0.5); b = torch.ones(1, 3)
    >>> linear_scan_reference(a, b)
    tensor([[1.0000, 1.5000, 1.7500]])
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    dim = time_dim(dim, a.dim())
    steps = range(a.shape[dim] - 1, -1, -1) if reverse else range(a.shape[dim])
    h = torch.zeros_like(b.select(dim, 0)) if h0 is None else h0
    out = [None] * a.shape[dim]
    for t in steps:
        h = a.select(dim, t) * h + b.select(dim, t)
        out[t] = h
    return torch.stack(out, dim=dim)
