"""The plain reference for matrix-state recurrences, one step at a time."""
from __future__ import annotations

import torch


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
