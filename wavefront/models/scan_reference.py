"""The plain reference for first-order linear recurrences: h_t = a_t * h_{t-1} + b_t."""
from __future__ import annotations

import torch


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
    dim = dim % a.dim()
    steps = range(a.shape[dim] - 1, -1, -1) if reverse else range(a.shape[dim])
    h = torch.zeros_like(b.select(dim, 0)) if h0 is None else h0
    out = [None] * a.shape[dim]
    for t in steps:
        h = a.select(dim, t) * h + b.select(dim, t)
        out[t] = h
    return torch.stack(out, dim=dim)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None):
    """Mamba's selective scan, one step at a time (the reference for the native kernel).

    u, delta, z: [batch, channels, T]; A: [channels, N]; B, C: [batch, N, T]; D: [channels].
    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t (state [batch, channels, N], zero at the
    start); y_t = C_t . h_t + D u_t, times silu(z_t) when z is given. Returns (y, last state).

    >>> y, h = selective_scan_reference(torch.ones(1, 2, 3), torch.ones(1, 2, 3), -torch.ones(2, 4),
    ...                                 torch.ones(1, 4, 3), torch.ones(1, 4, 3))
    >>> y.shape, h.shape
    (torch.Size([1, 2, 3]), torch.Size([1, 2, 4]))
    """
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype, device=u.device)
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y, h


def matrix_scan_reference(q, k, v, decay=None, S0=None):
    """Matrix-state linear recurrence (linear attention, RetNet, GLA, Mamba-2, Lightning), one
    step at a time: S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

    q, k: [..., T, dk]; v: [..., T, dv]; decay a: None (additive, a = 1), [..., T] (one scalar
    per step: RetNet, Mamba-2, Lightning) or [..., T, dk] (per key dim: GLA); S0: [..., dk, dv].
    Returns (o [..., T, dv], last state [..., dk, dv]).

    >>> o, S = matrix_scan_reference(torch.ones(1, 3, 2), torch.ones(1, 3, 2), torch.ones(1, 3, 4))
    >>> o[0, :, 0], S.shape
    (tensor([2., 4., 6.]), torch.Size([1, 2, 4]))
    """
    shape = (*q.shape[:-2], q.shape[-1], v.shape[-1])
    S = torch.zeros(shape, dtype=q.dtype, device=q.device) if S0 is None else S0
    outs = []
    for t in range(q.shape[-2]):
        if decay is not None:
            a = decay[..., t, None, None] if decay.dim() == q.dim() - 1 else decay[..., t, :, None]
            S = a * S
        S = S + k[..., t, :, None] * v[..., t, None, :]
        outs.append((q[..., t, :, None] * S).sum(-2))
    return torch.stack(outs, dim=-2), S
