"""The plain reference for first-order linear recurrences: h_t = a_t * h_{t-1} + b_t."""
from __future__ import annotations

import operator

import torch


def time_dim(dim: int, ndim: int) -> int:
    """`dim` as an index in [0, ndim), refused like torch refuses it (IndexError, never wrapped:
    dim=5 on a 3-D tensor is a mistake, not dim 2).

    >>> time_dim(-1, 3), time_dim(2, 3)
    (2, 2)
    """
    dim = operator.index(dim)
    if ndim == 0:
        raise IndexError(f"Dimension specified as {dim} but tensor has no dimensions")
    if not -ndim <= dim < ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], but got {dim})")
    return dim % ndim


def check_h0(h0: torch.Tensor, a: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> None:
    """Refuse an initial state that is not a without its time dim (`dim`, already in range) in
    shape, or not of `dtype` (default a's) on a's device: kernels read it as raw memory.

    >>> check_h0(torch.zeros(2, dtype=torch.float64), torch.zeros(2, 5), 1)
    Traceback (most recent call last):
    ValueError: h0 must match a's dtype and device (torch.float32 on cpu), got torch.float64 on cpu: pass h0.to(a)
    """
    want = a.shape[:dim] + a.shape[dim + 1:]
    if h0.shape != want:
        raise ValueError(f"h0 must have shape {tuple(want)} (a without its time dim), got {tuple(h0.shape)}")
    dtype = a.dtype if dtype is None else dtype
    if h0.dtype != dtype or h0.device != a.device:
        what, hint = ("a's dtype", "h0.to(a)") if dtype == a.dtype else ("the dtype of a and b promoted",
                                                                         f"h0.to({a.device}, {dtype})")
        raise ValueError(f"h0 must match {what} and device ({dtype} on {a.device}), got {h0.dtype} on {h0.device}: "
                         f"pass {hint}")


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
