"""Triton kernels for the matrix-state scan S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (forward).

One program per (batch x head, block of value columns):
"chunked" (additive or one decay per step): per chunk of C steps, matmuls (tl.dot) for the
intra-chunk part with D[i, j] = prod_{j < l <= i} a_l from a cumulative product down a C x C
tile (exact products: no logs, no division), and the [dk, BV] state carried in registers;
"recurrent" (any decay, also per key dim): one step at a time with the state in registers.
Both accumulate in float32 and never materialise all T states. Forward only: where autograd
needs gradients, the dispatcher uses the chunked torch form. On CPU the kernels run under
TRITON_INTERPRET=1 (tests, at tiny shapes); on a GPU they compile.
"""
from __future__ import annotations

import torch
from wavefront.backends.scans.triton_support import available, pow2, require, tl, triton

if triton is not None:
    @triton.jit
    def _program_state(s0_ptr, T, dk, dv, HAS_S0: tl.constexpr, DK: tl.constexpr, BV: tl.constexpr):
        # A matrix-scan program's (batch x head, value block): its indices, masks, the [DK, BV]
        # state block it carries (from S0 or zero) and the offsets of its rows of q/k and v.
        bh, vb = tl.program_id(0), tl.program_id(1)
        kk = tl.arange(0, DK)
        vv = vb * BV + tl.arange(0, BV)
        km, vm = kk < dk, vv < dv
        smask = km[:, None] & vm[None, :]
        soffs = bh.to(tl.int64) * dk * dv + kk[:, None] * dv + vv[None, :]
        if HAS_S0:
            S = tl.load(s0_ptr + soffs, mask=smask, other=0.0).to(tl.float32)
        else:
            S = tl.zeros([DK, BV], dtype=tl.float32)
        return bh, kk, vv, km, vm, soffs, smask, S, bh.to(tl.int64) * T * dk, bh.to(tl.int64) * T * dv

    @triton.jit
    def _matrix_recurrent_kernel(q_ptr, k_ptr, v_ptr, a_ptr, s0_ptr, o_ptr, sT_ptr, T, dk, dv,
                                 DECAY: tl.constexpr, HAS_S0: tl.constexpr, DK: tl.constexpr, BV: tl.constexpr):
        bh, kk, vv, km, vm, soffs, smask, S, base_k, base_v = _program_state(s0_ptr, T, dk, dv, HAS_S0, DK, BV)
        for t in range(T):
            q = tl.load(q_ptr + base_k + t * dk + kk, mask=km, other=0.0).to(tl.float32)
            k = tl.load(k_ptr + base_k + t * dk + kk, mask=km, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + base_v + t * dv + vv, mask=vm, other=0.0).to(tl.float32)
            if DECAY == 1:
                S = S * tl.load(a_ptr + bh.to(tl.int64) * T + t).to(tl.float32)
            if DECAY == 2:
                a = tl.load(a_ptr + base_k + t * dk + kk, mask=km, other=1.0).to(tl.float32)
                S = S * a[:, None]
            S = S + k[:, None] * v[None, :]
            o = tl.sum(q[:, None] * S, 0)
            tl.store(o_ptr + base_v + t * dv + vv, o.to(o_ptr.dtype.element_ty), mask=vm)
        tl.store(sT_ptr + soffs, S.to(sT_ptr.dtype.element_ty), mask=smask)

    @triton.jit
    def _mul(x, y):
        return x * y

    @triton.jit
    def _matrix_chunked_kernel(q_ptr, k_ptr, v_ptr, a_ptr, s0_ptr, o_ptr, sT_ptr, T, dk, dv,
                               DECAY: tl.constexpr, HAS_S0: tl.constexpr, C: tl.constexpr, DK: tl.constexpr,
                               BV: tl.constexpr):
        bh, kk, vv, km, vm, soffs, smask, S, base_k, base_v = _program_state(s0_ptr, T, dk, dv, HAS_S0, DK, BV)
        ii = tl.arange(0, C)
        lower = ii[:, None] >= ii[None, :]
        for t0 in range(0, T, C):
            rows = t0 + ii
            rm = rows < T
            qk_offs = base_k + rows[:, None] * dk + kk[None, :]
            Q = tl.load(q_ptr + qk_offs, mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
            K = tl.load(k_ptr + qk_offs, mask=rm[:, None] & km[None, :], other=0.0).to(tl.float32)
            V = tl.load(v_ptr + base_v + rows[:, None] * dv + vv[None, :], mask=rm[:, None] & vm[None, :],
                        other=0.0).to(tl.float32)
            scores = tl.dot(Q, tl.trans(K), input_precision="ieee")
            if DECAY == 1:
                a = tl.load(a_ptr + bh.to(tl.int64) * T + rows, mask=rm, other=1.0).to(tl.float32)
                # D[i, j] = prod_{j < l <= i} a_l: cumulative product down i of a_i below the diagonal
                M = tl.where(ii[:, None] > ii[None, :], a[:, None], 1.0)
                D = tl.associative_scan(M, 0, _mul)
                D = tl.where(lower, D, 0.0)
                P = tl.associative_scan(a, 0, _mul)  # prod_{l <= i} a_l
                d_end = tl.sum(tl.where(ii[:, None] == C - 1, D, 0.0), 0)  # D[last, j]
                p_end = tl.sum(tl.where(ii == C - 1, P, 0.0), 0)
                scores = scores * D
                inter = tl.dot(Q * P[:, None], S, input_precision="ieee")
                S = p_end * S + tl.dot(tl.trans(K * d_end[:, None]), V, input_precision="ieee")
            else:
                scores = tl.where(lower, scores, 0.0)
                inter = tl.dot(Q, S, input_precision="ieee")
                S = S + tl.dot(tl.trans(K), V, input_precision="ieee")
            o = tl.dot(scores, V, input_precision="ieee") + inter
            tl.store(o_ptr + base_v + rows[:, None] * dv + vv[None, :], o.to(o_ptr.dtype.element_ty),
                     mask=rm[:, None] & vm[None, :])
        tl.store(sT_ptr + soffs, S.to(sT_ptr.dtype.element_ty), mask=smask)


def triton_matrix_scan(q, k, v, decay=None, S0=None, form: str = "auto", chunk: int = 64, block_v: int = 64):
    """(o, last state) of S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (forward only), the
    contract of wavefront.backends.scans.linear.naive.matrix_scan_reference. form: "chunked" (additive or
    scalar decay), "recurrent" (any decay), "auto" (chunked where it applies)."""
    require(q)
    *lead, T, dk = q.shape
    dv = v.shape[-1]
    per_dim = decay is not None and decay.dim() == q.dim()
    kind = 0 if decay is None else (2 if per_dim else 1)
    if form == "auto":
        form = "recurrent" if per_dim else "chunked"
    if form == "chunked" and per_dim:
        raise ValueError("the chunked Triton kernel takes additive or per-step scalar decay; use form='recurrent'")
    BH = max(1, int(torch.tensor(lead).prod().item())) if lead else 1
    qf, kf, vf = (x.reshape(BH, T, x.shape[-1]).contiguous() for x in (q, k, v))
    af = decay.reshape(BH, T, *(dk,) if per_dim else ()).contiguous() if decay is not None else qf
    s0 = S0.reshape(BH, dk, dv).contiguous() if S0 is not None else qf
    o = torch.empty(BH, T, dv, dtype=q.dtype, device=q.device)
    sT = torch.empty(BH, dk, dv, dtype=q.dtype, device=q.device)
    DK, BV = pow2(dk), min(pow2(dv), pow2(block_v))
    grid = (BH, triton.cdiv(dv, BV))
    if form == "chunked":
        _matrix_chunked_kernel[grid](qf, kf, vf, af, s0, o, sT, T, dk, dv, DECAY=kind, HAS_S0=S0 is not None,
                                     C=pow2(chunk), DK=DK, BV=BV)
    elif form == "recurrent":
        _matrix_recurrent_kernel[grid](qf, kf, vf, af, s0, o, sT, T, dk, dv, DECAY=kind, HAS_S0=S0 is not None,
                                       DK=DK, BV=BV)
    else:
        raise ValueError(f"unknown form {form!r}: choose 'auto', 'chunked' or 'recurrent'")
    return o.reshape(*lead, T, dv), sT.reshape(*lead, dk, dv)


__all__ = ["available", "triton_matrix_scan"]
