"""Mamba's selective scan as torch ops around the first-order scan: any device, autograd, and under
torch.export the chunked linear scan with its carry in a scan op."""
from __future__ import annotations

import torch
from wavefront.backends.scans.linear.dispatch import linear_scan


def check_shapes(u, delta, A, B, C, D, z) -> None:
    """One error for any shape off the contract: the kernel indexes every tensor by u's sizes."""
    if u.dim() != 3 or delta.shape != u.shape or A.dim() != 2 or A.shape[0] != u.shape[1] \
            or B.shape != (u.shape[0], A.shape[1], u.shape[2]) or C.shape != B.shape \
            or (D is not None and D.shape != (u.shape[1],)) or (z is not None and z.shape != u.shape):
        shape = lambda t: tuple(t.shape) if t is not None else None  # noqa: E731
        raise ValueError(f"selective_scan shapes: u, delta [batch, channels, T] {shape(u)} {shape(delta)}, "
                         f"A [channels, N] {shape(A)}, B and C [batch, N, T] {shape(B)} {shape(C)}, "
                         f"D [channels] {shape(D)}, z [batch, channels, T] {shape(z)}")


def selective_scan_torch(u, delta, A, B, C, D=None, z=None):
    """The selective scan as torch ops around linear_scan (any device, autograd, and under
    torch.export the chunked form with its carry in a scan op). Materialises the [batch,
    channels, T, N] coefficients; same contract as selective_scan.

    >>> from wavefront.backends.scans.selective.naive import selective_scan_reference
    >>> args = (torch.rand(1, 2, 9), torch.rand(1, 2, 9), -torch.rand(2, 4), torch.rand(1, 4, 9), torch.rand(1, 4, 9))
    >>> all(torch.allclose(x, y, atol=1e-6) for x, y in zip(selective_scan_torch(*args), selective_scan_reference(*args)))
    True
    """
    check_shapes(u, delta, A, B, C, D, z)  # broadcasting would hide a wrong D or z
    dA = torch.exp(delta[..., None] * A[None, :, None, :])  # [batch, channels, T, N]
    dBu = (delta * u)[..., None] * B.transpose(-1, -2)[:, None]
    h = linear_scan(dA, dBu, dim=2)
    y = (h * C.transpose(-1, -2)[:, None]).sum(-1)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y, h[:, :, -1]
