"""The chunked matrix-state scan in plain torch: S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.

T steps are cut into chunks of C. Inside a chunk everything is matmuls over all chunks at once:
with D[i, j] = prod_{j < l <= i} a_l (the decay from step j to step i, zero for j > i),
  o_i = sum_{j <= i} (q_i . (D[i, j] * k_j)) v_j  +  (P_i * q_i)^T S_in       (P_i = prod_{l <= i} a_l)
  S_out = P_last * S_in + sum_j (D[last, j] * k_j) v_j^T.
Across chunks only the C-times-shorter state recurrence S_in -> S_out remains, itself a
first-order scan (linear_scan). D is built by a masked cumulative product, never by dividing
cumulative products or by cumsum in log space (those turn into 0/0 or overflow once a product
underflows, which a few hundred steps of decay do). The [T, dk, dv] states are never all
materialised: one per chunk. Low-precision inputs accumulate in float32.
"""
from __future__ import annotations

import torch
from wavefront.backends.scans.linear.dispatch import linear_scan

ALL_STATES_AT_ONCE = 1 << 22  # elements of chunk states (n x state) held at once; above: chunk by chunk


def check_shapes(q, k, v, decay=None, S0=None) -> None:
    """One error for any shape off the matrix-scan contract (every form indexes by q's sizes).

    >>> check_shapes(torch.ones(1, 3, 2), torch.ones(1, 3, 2), torch.ones(1, 4, 2))
    Traceback (most recent call last):
    ...
    ValueError: q, k must be [..., T, dk] and v [..., T, dv] alike, got (1, 3, 2), (1, 3, 2), (1, 4, 2)
    """
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"q, k must be [..., T, dk] and v [..., T, dv] alike, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    per_dim = decay is not None and decay.dim() == q.dim()
    if decay is not None and decay.shape != (q.shape if per_dim else q.shape[:-1]):
        raise ValueError(f"decay must be [..., T] or [..., T, dk] like q {tuple(q.shape)}, got {tuple(decay.shape)}")
    state = (*q.shape[:-2], q.shape[-1], v.shape[-1])
    if S0 is not None and (S0.dim() > len(state) or any(a not in (1, b) for a, b in zip(S0.shape[::-1], state[::-1]))):
        raise ValueError(f"S0 must broadcast to [..., dk, dv] = {list(state)}, got {tuple(S0.shape)}")


def cumulative_product(x: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.cumprod, or under torch.export the same products by doubling (log2 n multiplies of
    shifted copies): ONNX has no cumulative product, and a log-space cumsum would break on
    zeros and negative factors.

    >>> cumulative_product(torch.tensor([2.0, 0.0, 3.0]), 0)
    tensor([2., 0., 0.])
    """
    if not torch.compiler.is_exporting():
        return torch.cumprod(x, dim=dim)
    n, shift = x.shape[dim], 1
    while shift < n:
        ones = torch.ones_like(x.narrow(dim, 0, shift))
        x = x * torch.cat([ones, x.narrow(dim, 0, n - shift)], dim)
        shift *= 2
    return x


def _per_dim_decay_terms(qc, kc, ac):
    """Per-key-dim decay (GLA): with K_i[j] = D[i, j] * k_j (a [C, dk] block per step i, built
    row after row: K_i = a_i * K_{i-1}, then row i = k_i), scores[i, j] = q_i . K_i[j] and the
    keys decayed to the chunk's end are K_last; P_i = prod_{l <= i} a_l. C steps over
    [..., n, C, dk] blocks: no [C, C, dk] tensor (a cumulative product down it was 4x slower)."""
    C = qc.shape[-2]
    K = torch.zeros_like(kc)
    in_place = not (torch.is_grad_enabled() and (kc.requires_grad or ac.requires_grad))  # autograd saves K
    rows = []
    for i in range(C):
        K = K.mul_(ac[..., i:i + 1, :]) if in_place else K * ac[..., i:i + 1, :]
        K[..., i, :] = kc[..., i, :]
        rows.append(K @ qc[..., i, :, None])  # [..., n, C, 1]: q_i . K_i[j] for every j
    return torch.cat(rows, -1).transpose(-1, -2), K, cumulative_product(ac, -2)


def chunked_matrix_scan(q, k, v, decay=None, S0=None, chunk: int | None = None):
    """(o, last state) of the matrix-state recurrence; the same contract as
    wavefront.backends.scans.linear.naive.matrix_scan_reference.

    >>> q, k, v = torch.randn(2, 37, 4), torch.randn(2, 37, 4), torch.randn(2, 37, 3)
    >>> a = torch.rand(2, 37)
    >>> from wavefront.backends.scans.matrix.naive import matrix_scan_reference
    >>> o, S = chunked_matrix_scan(q, k, v, a, chunk=8)
    >>> ro, rS = matrix_scan_reference(q, k, v, a)
    >>> bool(torch.allclose(o, ro, atol=1e-5) and torch.allclose(S, rS, atol=1e-5))
    True
    """
    check_shapes(q, k, v, decay, S0)
    *lead, T, dk = q.shape
    dv = v.shape[-1]
    per_dim = decay is not None and decay.dim() == q.dim()
    out_dtype = q.dtype
    ct = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    C = chunk or (16 if per_dim else 64)  # per-dim decay makes D [C, C, dk]: a smaller chunk
    n = (T + C - 1) // C  # not -(-T // C): ONNX divides truncating toward zero
    pad = n * C - T
    q, k, v = (x.to(ct) for x in (q, k, v))
    a = (torch.ones(*lead, T, dtype=ct, device=q.device) if decay is None else decay.to(ct))
    if pad:  # identity steps (a = 1, k = v = q = 0) after the end change nothing before it
        def grow(x, fill, dim):
            extra = list(x.shape)
            extra[dim] = pad
            return torch.cat([x, torch.full(extra, fill, dtype=ct, device=x.device)], dim)
        q, k, v = grow(q, 0.0, -2), grow(k, 0.0, -2), grow(v, 0.0, -2)
        a = grow(a, 1.0, -2 if per_dim else -1)
    qc, kc, vc = (x.reshape(*lead, n, C, x.shape[-1]) for x in (q, k, v))
    ac = a.reshape(*lead, n, C, *((dk,) if per_dim else ()))
    if per_dim:
        scores, k_to_end, P = _per_dim_decay_terms(qc, kc, ac)
        a_chunk = P[..., -1, :]  # [..., n, dk]
    else:
        # D[i, j] = prod_{j < l <= i} a_l: cumulative product down i of a_i below the diagonal, 1 elsewhere
        tri = torch.tril(torch.ones(C, C, dtype=torch.bool, device=q.device), -1)
        D = cumulative_product(torch.where(tri, ac.unsqueeze(-1), torch.ones((), dtype=ct, device=q.device)), -2)
        D = D * torch.tril(torch.ones(C, C, dtype=torch.bool, device=q.device))
        P = D[..., :, 0] * ac[..., :1]  # prod_{l <= i} a_l
        scores = (qc @ kc.transpose(-1, -2)) * D
        k_to_end = D[..., -1, :, None] * kc
        a_chunk = P[..., -1, None].expand(*lead, n, dk)
    o = scores @ vc  # intra-chunk
    h0 = torch.zeros(*lead, dk, dv, dtype=ct, device=q.device) if S0 is None else S0.to(ct)
    qP = qc * (P if per_dim else P[..., None])  # q_i scaled by the decay since the chunk's start
    if n * h0.numel() <= ALL_STATES_AT_ONCE:
        # the state entering each chunk, all at once: a first-order scan over chunks
        # (S_in(c + 1) = a_chunk(c) * S_in(c) + U(c)), then one batched matmul
        U = k_to_end.transpose(-1, -2) @ vc  # [..., n, dk, dv]: what each chunk adds to the state
        A_chunks = a_chunk[..., None].expand(*lead, n, dk, dv)
        S_after = linear_scan(torch.movedim(A_chunks, -3, 0).contiguous(), torch.movedim(U, -3, 0).contiguous(),
                              h0, dim=0)
        S_after = torch.movedim(S_after, 0, -3)  # [..., n, dk, dv]
        S_in = torch.cat([h0.unsqueeze(-3), S_after[..., :-1, :, :]], dim=-3)
        o = o + qP @ S_in  # inter-chunk
        S_last = S_after[..., -1, :, :]
    else:  # too many chunk states to hold: carry one from chunk to chunk (n small matmuls)
        S, inter = h0, []
        for c in range(n):
            inter.append(qP[..., c, :, :] @ S)
            S = a_chunk[..., c, :, None] * S + k_to_end[..., c, :, :].transpose(-1, -2) @ vc[..., c, :, :]
        o = o + torch.stack(inter, -3)
        S_last = S
    o = o.reshape(*lead, n * C, dv)[..., :T, :]
    return o.to(out_dtype), S_last.to(out_dtype)


__all__ = ["check_shapes", "chunked_matrix_scan", "cumulative_product"]
