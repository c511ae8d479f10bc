"""mamba_ssm's scan functions (selective_scan_fn, selective_state_update, mamba_chunk_scan_combined)
on wavefront's scans: any device, autograd, float32 / float64 (half precision accumulates in float32).

- selective_scan_fn (Mamba-1): the native CPU selective-scan kernel where it applies, else the
  torch form (wavefront.backends.scans.selective.dispatch).
- mamba_chunk_scan_combined (Mamba-2's SSD): a scalar-decay matrix state per head,
  S_t = exp(dt_t A) S_{t-1} + B_t (dt_t x_t)^T, y_t = S_t^T C_t + D x_t: the chunked matrix scan.
- selective_state_update: one decode step of either, updating the state in place.
The results do not depend on mamba_ssm's tuning arguments (chunk_size).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wavefront.backends.scans.matrix.dispatch import matrix_scan
from wavefront.backends.scans.selective.dispatch import selective_scan
from wavefront.backends.scans.shapes import compute_dtype
from wavefront.kernels.unsupported import Unsupported


def _dt(dt, dt_bias, softplus, limit=None):
    """dt + bias, softplus'd if asked, clamped to `limit` when given (mamba_chunk_scan_combined
    clamps always, to (0, inf) by default: a negative dt becomes 0; selective_scan_fn never)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if softplus:
        dt = F.softplus(dt)
    if limit is not None:
        dt = dt.clamp(min=limit[0], max=limit[1])
    return dt


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba_ssm's selective_scan_fn: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t (zero start),
    y_t = C_t . h_t + D u_t, times silu(z_t) when z is given.

    u, delta, z: [batch, dim, L]; A: [dim, N] (real); B, C: [batch, N, L] or [batch, groups, N, L];
    D, delta_bias: [dim]. Returns y [batch, dim, L] in u's dtype (and the last state [batch, dim, N]).

    >>> y = selective_scan_fn(torch.ones(1, 2, 3), torch.ones(1, 2, 3), -torch.ones(2, 4),
    ...                       torch.ones(1, 4, 3), torch.ones(1, 4, 3))
    >>> y.shape
    torch.Size([1, 2, 3])
    """
    if A.is_complex():
        raise Unsupported("wavefront's selective_scan_fn takes a real A (every Mamba model in transformers uses one)")
    if B.dim() < 3 or C.dim() < 3:
        raise Unsupported("wavefront's selective_scan_fn takes input-dependent B and C ([batch, N, L] or "
                         f"[batch, groups, N, L]), got B {tuple(B.shape)}, C {tuple(C.shape)}")
    ct = compute_dtype(u, delta, A, B, C, D, z)
    dt = _dt(delta.to(ct), None if delta_bias is None else delta_bias.to(ct)[..., None], delta_softplus)
    f = lambda t: None if t is None else t.to(ct)  # noqa: E731
    u_, A_, D_, z_ = f(u), f(A), f(D), f(z)
    if B.dim() == 3:
        y, h = selective_scan(u_, dt, A_, f(B), f(C), D_, z_)
    else:  # groups of channels share B and C: one scan per group
        G, width = B.shape[1], u.shape[1] // B.shape[1]
        parts = [selective_scan(u_[:, g * width:(g + 1) * width], dt[:, g * width:(g + 1) * width],
                                A_[g * width:(g + 1) * width], f(B[:, g]), f(C[:, g]),
                                None if D_ is None else D_[g * width:(g + 1) * width],
                                None if z_ is None else z_[:, g * width:(g + 1) * width]) for g in range(G)]
        y, h = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
    y = y.to(u.dtype)
    return (y, h.to(u.dtype)) if return_last_state else y


def _heads(t: torch.Tensor | None, like_state: bool):
    return t if t is None or not like_state else t.unsqueeze(1)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """mamba_ssm's selective_state_update: one step of the selective scan, the state updated in place.

    Mamba-1 layout: state [batch, dim, N], x, dt, z [batch, dim], A [dim, N], B, C [batch, N],
    D, dt_bias [dim]. Mamba-2 layout: one more head axis: state [batch, heads, dim, N], x, dt, z
    [batch, heads, dim], A [heads, dim, N], B, C [batch, groups, N], D, dt_bias [heads, dim].
    Returns the output like x.

    >>> state = torch.zeros(1, 2, 4)
    >>> out = selective_state_update(state, torch.ones(1, 2), torch.ones(1, 2), -torch.ones(2, 4),
    ...                              torch.ones(1, 4), torch.ones(1, 4))
    >>> out.shape, round(state[0, 0, 0].item(), 4)
    (torch.Size([1, 2]), 1.0)
    """
    if state_batch_indices is not None:
        raise Unsupported("state_batch_indices (an indexed state cache) is not supported by wavefront's "
                         "selective_state_update: pass the states of the batch rows in order")
    mamba1 = state.dim() == 3
    st, x_, dt_, z_ = (_heads(t, mamba1) for t in (state, x, dt, z))
    A_, D_, bias = (None if t is None else (t.unsqueeze(0) if mamba1 else t) for t in (A, D, dt_bias))
    B_, C_ = (t.unsqueeze(1) if mamba1 else t for t in (B, C))
    ct = compute_dtype(state, x, dt, A, B, C)
    d = _dt(dt_.to(ct), None if bias is None else bias.to(ct), dt_softplus)
    heads, groups = st.shape[1], B_.shape[1]
    Bh = B_.to(ct).repeat_interleave(heads // groups, dim=1)[:, :, None, :]  # [batch, heads, 1, N]
    Ch = C_.to(ct).repeat_interleave(heads // groups, dim=1)[:, :, None, :]
    new = st.to(ct) * torch.exp(d[..., None] * A_.to(ct)) + d[..., None] * Bh * x_.to(ct)[..., None]
    st.copy_(new.to(st.dtype))
    out = (new * Ch).sum(-1)
    if D_ is not None:
        out = out + x_.to(ct) * D_.to(ct)
    if z_ is not None:
        out = out * F.silu(z_.to(ct))
    out = out.to(x.dtype)
    return out.squeeze(1) if mamba1 else out


def _seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    if batch != 1:
        raise ValueError(f"cu_seqlens packs sequences into one batch row; got batch {batch}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(lengths.sum()) != length:
        raise ValueError(f"cu_seqlens covers {int(lengths.sum())} tokens, the input has {length}")
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)[None]


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                              return_final_states=False, return_varlen_states=False):
    """mamba_ssm's mamba_chunk_scan_combined (Mamba-2's SSD), per batch row and head:
    S_t = exp(dt_t A) S_{t-1} + (dt_t x_t) B_t^T (state [head_dim, N]), y_t = S_t C_t + D x_t,
    times silu(z_t) when z is given.

    x, z: [batch, L, heads, head_dim]; dt: [batch, L, heads]; A: [heads]; B, C: [batch, L, groups, N];
    D: [heads] or [heads, head_dim]; dt_bias: [heads]; initial_states: [batch, heads, head_dim, N].
    seq_idx [batch, L] (or cu_seqlens for one packed row) starts a fresh state where the index
    changes. Returns y like x (and the final states [batch, heads, head_dim, N]).

    >>> y = mamba_chunk_scan_combined(torch.ones(1, 5, 2, 3), torch.ones(1, 5, 2), -torch.ones(2),
    ...                               torch.ones(1, 5, 1, 4), torch.ones(1, 5, 1, 4))
    >>> y.shape
    torch.Size([1, 5, 2, 3])
    """
    if return_varlen_states:
        raise Unsupported("return_varlen_states is not supported by wavefront's mamba_chunk_scan_combined: "
                         "run each sequence as its own batch row to get its final state")
    batch, length, heads, _ = x.shape
    if cu_seqlens is not None and seq_idx is None:
        seq_idx = _seq_idx_from_cu_seqlens(cu_seqlens, batch, length)
    ct = compute_dtype(x, dt, A, B, C, D, z, initial_states)
    d = _dt(dt.to(ct), None if dt_bias is None else dt_bias.to(ct), dt_softplus, dt_limit)  # [b, L, h]
    groups = B.shape[2]
    to_heads = lambda t: t.to(ct).repeat_interleave(heads // groups, dim=2).transpose(1, 2)  # noqa: E731
    q, k = to_heads(C), to_heads(B)  # [b, h, L, N]
    v = (x.to(ct) * d[..., None]).transpose(1, 2)  # [b, h, L, head_dim]
    decay = torch.exp(d * A.to(ct)).transpose(1, 2)  # [b, h, L]
    if seq_idx is not None:  # a new sequence starts from a fresh state: decay 0 at its first step
        starts = torch.zeros_like(seq_idx, dtype=torch.bool)
        starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
        decay = decay.masked_fill(starts[:, None, :], 0.0)
    S0 = None if initial_states is None else initial_states.to(ct).transpose(-1, -2)
    o, S = matrix_scan(q, k, v, decay, S0)
    y = o.transpose(1, 2)  # [b, L, h, head_dim]
    if D is not None:
        y = y + x.to(ct) * (D.to(ct)[:, None] if D.dim() == 1 else D.to(ct))
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(x.dtype).contiguous()  # mamba_ssm's outputs are contiguous: callers view() them
    return (y, S.transpose(-1, -2).contiguous()) if return_final_states else y


__all__ = ["mamba_chunk_scan_combined", "selective_scan_fn", "selective_state_update"]
