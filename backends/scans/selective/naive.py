"""The plain reference for Mamba's selective scan, one step at a time."""
from __future__ import annotations

import torch


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
