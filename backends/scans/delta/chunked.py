"""The chunked delta rule in plain torch (the WY / UT-transform form), and DeltaProduct on top of it.

For t = 1..T: S <- exp(g_t) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T q_t, with g None,
one scalar per step, or one per key dim (a diagonal decay on the rows of S).

T steps are cut into chunks of C. Inside a chunk, with b_i the log decay summed from the chunk's
start to step i (inclusive) and E[i, j] = exp(b_i - b_j) for j <= i (the decay from step j to i;
a [dk] vector each for per-key-dim gates), every step writes w_i = beta_i (v_i - k_i^T S_{i-1})
and the state after step i is exp(b_i) S_in + sum_{j <= i} (E[i, j] k_j) w_j^T. Putting that back
into w_i gives a unit lower triangular C x C system
    (I + A) W = diag(beta) (V - K~ S_in),  A[i, j] = beta_i k_i^T (E[i, j] k_j) for j < i,
with K~_i = exp(b_i) k_i, so W = U - Wk S_in where (I + A) [U | Wk] = diag(beta) [V | K~]: one
triangular solve per chunk, for all chunks at once, before the state is known. Then
    o_i   = (exp(b_i) q_i)^T S_in + sum_{j <= i} q_i^T (E[i, j] k_j) w_j
    S_out = exp(b_last) S_in + sum_j (E[last, j] k_j) w_j^T.
Only S_in -> S_out (two small matmuls) runs chunk after chunk; one [dk, dv] state is alive at a
time, never T of them. Low-precision inputs accumulate in float32.

Every exponential here is of a sum of log decays over steps forward in time (b_i - b_j, j <= i,
or b_i itself): all <= 0, so nothing overflows and an underflow to 0 is the true value rounded.
The usual shortcut E[i, j] = exp(b_i) * exp(-b_j) (which turns the per-dim case into one matmul)
multiplies exp(+|b|) by exp(-|b|): at g = -5 it overflows float32 after 18 steps. So per-key-dim
gates build E as an explicit [C, C, dk] tensor, with a smaller chunk (16) to keep it small.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SOLVES = ("triangular", "matmul")


def _unit_lower_solve(A, B, solve: str):
    """X with (I + A) X = B, A strictly lower triangular [..., C, C].

    "matmul" uses only matmuls (ONNX has no triangular solve): N = -A is nilpotent (N^C = 0), so
    (I - N)^{-1} = I + N + N^2 + ... = prod_{k < m} (I + N^(2^k)) with 2^m >= C, applied to B one
    factor at a time (the factors commute): m - 1 C x C squarings and m products with B."""
    if solve == "triangular":
        return torch.linalg.solve_triangular(A, B, upper=False, unitriangular=True)
    N, X = -A, B
    m = (A.shape[-1] - 1).bit_length()
    for step in range(m):
        X = X + N @ X
        if step < m - 1:
            N = N @ N
    return X


def _check(q, k, v, beta, g, S0):
    lead = q.shape[:-2]
    if q.dim() < 2 or k.shape != q.shape or v.dim() != q.dim() or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"q, k must be [..., T, dk] and v [..., T, dv] alike, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if beta.shape != q.shape[:-1]:
        raise ValueError(f"beta must be [..., T] like q {tuple(q.shape)}, got {tuple(beta.shape)}")
    if g is not None and g.shape not in (q.shape, q.shape[:-1]):
        raise ValueError(f"g must be [..., T] or [..., T, dk] like q {tuple(q.shape)}, got {tuple(g.shape)}")
    if S0 is not None and S0.shape != (*lead, q.shape[-1], v.shape[-1]):
        raise ValueError(f"S0 must be [..., dk, dv] = {(*lead, q.shape[-1], v.shape[-1])}, got {tuple(S0.shape)}")


def chunked_delta_rule(q, k, v, beta, g=None, S0=None, chunk: int | None = None, solve: str = "triangular"):
    """(o, last state) of the (gated) delta rule; the same contract as
    wavefront.backends.scans.delta.naive.delta_rule_reference.

    chunk: steps per chunk (default 64, or 16 for per-key-dim gates g [..., T, dk], whose pairwise
    decays are [C, C, dk]; never more than T). solve: "triangular" (torch.linalg.solve_triangular)
    or "matmul" (matmuls only, for ONNX export); both are differentiable.

    >>> gen = torch.Generator().manual_seed(0)
    >>> q, v = torch.randn(2, 37, 4, generator=gen), torch.randn(2, 37, 3, generator=gen)
    >>> k = torch.nn.functional.normalize(torch.randn(2, 37, 4, generator=gen), dim=-1)
    >>> beta, g = torch.rand(2, 37, generator=gen), -torch.rand(2, 37, 4, generator=gen)
    >>> from wavefront.backends.scans.delta.naive import delta_rule_reference
    >>> o, S = chunked_delta_rule(q, k, v, beta, g, chunk=8)
    >>> ro, rS = delta_rule_reference(q, k, v, beta, g)
    >>> bool(torch.allclose(o, ro, atol=1e-5) and torch.allclose(S, rS, atol=1e-5))
    True
    """
    _check(q, k, v, beta, g, S0)
    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {SOLVES}, got {solve!r}")
    *lead, T, dk = q.shape
    dv = v.shape[-1]
    per_dim = g is not None and g.dim() == q.dim()
    out_dtype = q.dtype
    ct = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    h0 = torch.zeros(*lead, dk, dv, dtype=ct, device=q.device) if S0 is None else S0.to(ct)
    if T == 0:
        return q.new_zeros(*lead, 0, dv), h0.to(out_dtype)
    C = chunk or min(16 if per_dim else 64, T)
    if C < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = (T + C - 1) // C  # not -(-T // C): ONNX divides truncating toward zero
    pad = n * C - T
    q, k, v, beta = (x.to(ct) for x in (q, k, v, beta))
    g = torch.zeros(*lead, T, dtype=ct, device=q.device) if g is None else g.to(ct)
    if pad:  # steps with k = v = q = beta = g = 0 after the end change nothing before it
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta = F.pad(beta, (0, pad))
        g = F.pad(g, (0, 0, 0, pad) if per_dim else (0, pad))
    qc, kc, vc = (x.reshape(*lead, n, C, x.shape[-1]) for x in (q, k, v))
    bc = beta.reshape(*lead, n, C, 1)
    b = g.reshape(*lead, n, C, *((dk,) if per_dim else ())).cumsum(dim=-2 if per_dim else -1)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if per_dim:
        # E[i, j, :] = exp(b_i - b_j) for j <= i, 0 above: [..., n, C, C, dk], every exponent <= 0
        E = torch.exp((b[..., :, None, :] - b[..., None, :, :]).masked_fill(~lower[:, :, None], float("-inf")))
        KE = E * kc[..., None, :, :]  # [i, j] = E[i, j] * k_j
        kk_qk = KE @ torch.stack([kc, qc], dim=-1)  # [..., n, C, C, 2]: k_i . KE[i, j] and q_i . KE[i, j]
        kk, qk = kk_qk[..., 0], kk_qk[..., 1]
        from_start = torch.exp(b)  # [..., n, C, dk]
        to_end = torch.exp(b[..., -1:, :] - b)
        a_chunk = from_start[..., -1, :, None]  # [..., n, dk, 1]
    else:
        E = torch.exp((b[..., :, None] - b[..., None, :]).masked_fill(~lower, float("-inf")))  # [..., n, C, C]
        kk = (kc @ kc.transpose(-1, -2)) * E
        qk = (qc @ kc.transpose(-1, -2)) * E
        from_start = torch.exp(b)[..., None]  # [..., n, C, 1]
        to_end = torch.exp(b[..., -1:] - b)[..., None]
        a_chunk = from_start[..., -1, :, None]  # [..., n, 1, 1]
    A = (bc * kk).tril(-1)  # strictly lower: row i scaled by beta_i
    X = _unit_lower_solve(A, bc * torch.cat([vc, from_start * kc], dim=-1), solve)
    U, Wk = X[..., :dv], X[..., dv:]  # W = U - Wk S_in
    WkQ = torch.cat([Wk, from_start * qc], dim=-2)  # [..., n, 2C, dk]: both read S_in in one matmul
    k_to_end = (to_end * kc).transpose(-1, -2)  # [..., n, dk, C]
    S, Ws, inter = h0, [], []
    for c in range(n):
        Y = WkQ[..., c, :, :] @ S
        W = U[..., c, :, :] - Y[..., :C, :]
        Ws.append(W)
        inter.append(Y[..., C:, :])
        S = a_chunk[..., c, :, :] * S + k_to_end[..., c, :, :] @ W
    o = torch.stack(inter, dim=-3) + qk @ torch.stack(Ws, dim=-3)  # inter-chunk + intra-chunk
    o = o.reshape(*lead, n * C, dv)[..., :T, :]
    return o.to(out_dtype), S.to(out_dtype)


def _spread(x, n_h: int, at: int, dim: int):
    """x with a factor axis of n_h inserted at `dim` (right after T), x at index `at`, zeros elsewhere."""
    zero = torch.zeros_like(x)
    return torch.stack([x if h == at else zero for h in range(n_h)], dim=dim)


def chunked_delta_product(q, k, v, beta, g=None, S0=None, chunk: int | None = None, solve: str = "triangular"):
    """(o, last state) of DeltaProduct; the same contract as
    wavefront.backends.scans.delta.naive.delta_product_reference (k [..., T, n_h, dk],
    v [..., T, n_h, dv], beta [..., T, n_h]).

    The n_h factors of each step become n_h steps of one delta rule of length T * n_h: the decay
    sits on the first sub-step (g = 0 on the others), the query on the last (q = 0 on the others,
    whose outputs are dropped). chunk and solve are chunked_delta_rule's, counted in sub-steps.

    >>> gen = torch.Generator().manual_seed(0)
    >>> q, v = torch.randn(2, 9, 4, generator=gen), torch.randn(2, 9, 3, 3, generator=gen)
    >>> k = torch.nn.functional.normalize(torch.randn(2, 9, 3, 4, generator=gen), dim=-1)
    >>> beta, g = torch.rand(2, 9, 3, generator=gen), -torch.rand(2, 9, generator=gen)
    >>> from wavefront.backends.scans.delta.naive import delta_product_reference
    >>> o, S = chunked_delta_product(q, k, v, beta, g, chunk=4)
    >>> ro, rS = delta_product_reference(q, k, v, beta, g)
    >>> bool(torch.allclose(o, ro, atol=1e-5) and torch.allclose(S, rS, atol=1e-5))
    True
    """
    if k.dim() != q.dim() + 1 or k.shape[:-2] != q.shape[:-1] or k.shape[-1] != q.shape[-1] \
            or v.dim() != k.dim() or v.shape[:-1] != k.shape[:-1] or beta.shape != k.shape[:-1]:
        raise ValueError(f"q must be [..., T, dk], k [..., T, n_h, dk], v [..., T, n_h, dv] and beta [..., T, n_h], "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(beta.shape)}")
    if g is not None and g.shape not in (q.shape, q.shape[:-1]):
        raise ValueError(f"g must be [..., T] or [..., T, dk] like q {tuple(q.shape)}, got {tuple(g.shape)}")
    T, n_h = k.shape[-3], k.shape[-2]
    per_dim = g is not None and g.dim() == q.dim()
    qs = _spread(q, n_h, n_h - 1, -2).flatten(-3, -2)
    gs = None if g is None else (_spread(g, n_h, 0, -2).flatten(-3, -2) if per_dim
                                 else _spread(g, n_h, 0, -1).flatten(-2, -1))
    o, S = chunked_delta_rule(qs, k.flatten(-3, -2), v.flatten(-3, -2), beta.flatten(-2, -1), gs, S0,
                              chunk=chunk, solve=solve)
    return o.unflatten(-2, (T, n_h))[..., -1, :], S


__all__ = ["chunked_delta_product", "chunked_delta_rule"]
