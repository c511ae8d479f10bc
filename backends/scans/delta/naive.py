"""The plain references for the delta-rule family, one step at a time."""
from __future__ import annotations

import torch


def _decay(S, g, t, per_dim):
    """S scaled by exp(g_t): one scalar per step, or one factor per key dim (a row of S each)."""
    if g is None:
        return S
    return S * (torch.exp(g[..., t, :, None]) if per_dim else torch.exp(g[..., t, None, None]))


def _delta_update(S, k, v, beta):
    """S + beta k (v - S^T k)^T: S moves its answer for key k a fraction beta of the way to v."""
    err = v - (k[..., None, :] @ S).squeeze(-2)
    return S + beta[..., None, None] * k[..., :, None] * err[..., None, :]


def delta_rule_reference(q, k, v, beta, g=None, S0=None):
    """The (gated) delta rule, one step at a time: for t = 1..T
        S <- exp(g_t) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T q_t.

    q, k: [..., T, dk]; v: [..., T, dv]; beta: [..., T]; g (log decay): None (DeltaNet), [..., T]
    (one scalar per step: gated DeltaNet, Qwen3-Next) or [..., T, dk] (S[i, :] *= exp(g_t[i]): KDA);
    S0: [..., dk, dv]. q is not scaled and k not normalised here (callers do that). Returns
    (o [..., T, dv], last state [..., dk, dv]), computed in the inputs' dtype.

    Writing the same key twice with beta = 1 overwrites the value (beta = 1/2 goes halfway):

    >>> k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> v = torch.tensor([[2.0], [3.0]])
    >>> delta_rule_reference(k, k, v, torch.tensor([1.0, 1.0]))[0][:, 0]
    tensor([2., 3.])
    >>> delta_rule_reference(k, k, v, torch.tensor([0.5, 0.5]))[0][:, 0]
    tensor([1., 2.])
    """
    # one factor per step: DeltaProduct with n_h = 1
    return delta_product_reference(q, k[..., None, :], v[..., None, :], beta[..., None], g, S0)


def delta_product_reference(q, k, v, beta, g=None, S0=None):
    """DeltaProduct, one step at a time: each step applies its decay once, then n_h delta updates
    (Householder-like factors) in order, then reads o_t = S^T q_t.

    q: [..., T, dk]; k: [..., T, n_h, dk]; v: [..., T, n_h, dv]; beta: [..., T, n_h]; g and S0 as
    in delta_rule_reference (g is per step, not per factor). Returns (o [..., T, dv], last state).

    Two orthogonal keys in one step are both stored; the query reads the first:

    >>> k = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    >>> o, S = delta_product_reference(torch.tensor([[1.0, 0.0]]), k, torch.tensor([[[2.0], [5.0]]]),
    ...                                torch.ones(1, 2))
    >>> o, S[:, 0]
    (tensor([[2.]]), tensor([2., 5.]))
    """
    per_dim = g is not None and g.dim() == q.dim()
    shape = (*q.shape[:-2], q.shape[-1], v.shape[-1])
    S = torch.zeros(shape, dtype=q.dtype, device=q.device) if S0 is None else S0
    outs = []
    for t in range(q.shape[-2]):
        S = _decay(S, g, t, per_dim)
        for h in range(k.shape[-2]):
            S = _delta_update(S, k[..., t, h, :], v[..., t, h, :], beta[..., t, h])
        outs.append((q[..., t, None, :] @ S).squeeze(-2))
    return torch.stack(outs, dim=-2) if outs else q.new_zeros(*q.shape[:-1], v.shape[-1]), S


__all__ = ["delta_product_reference", "delta_rule_reference"]
