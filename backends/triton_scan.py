"""Triton kernels for the scans: the first-order scan and the matrix-state scan (forward).

- first order, h_t = a_t h_{t-1} + b_t: one program per block of channels walks time in tiles of
  BT steps; inside a tile an associative scan of the (a, b) pairs (tl.associative_scan), across
  tiles one carry per channel in registers. Reads a and b once, writes h once.
- matrix state, S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, one program per
  (batch x head, block of value columns):
  "chunked" (additive or one decay per step): per chunk of C steps, matmuls (tl.dot) for the
  intra-chunk part with D[i, j] = prod_{j < l <= i} a_l from a cumulative product down a C x C
  tile (exact products: no logs, no division), and the [dk, BV] state carried in registers;
  "recurrent" (any decay, also per key dim): one step at a time with the state in registers.
Both accumulate in float32 and never materialise all T states. Forward only: where autograd
needs gradients, the dispatchers use the torch forms. On CPU the kernels run under
TRITON_INTERPRET=1 (tests, at tiny shapes); on a GPU they compile.
"""
from __future__ import annotations

import os

import torch

from wavefront.models.scan_reference import check_h0, time_dim

try:
    import triton
    import triton.language as tl
except ImportError:  # the extra is not installed: available() says so
    triton = None


def available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """(can the Triton kernels run on `device`?, why not)."""
    if triton is None:
        return False, "triton is not installed (pip install 'wavefront[triton]')"
    if torch.device(device).type == "cuda":
        return (torch.cuda.is_available(), "" if torch.cuda.is_available() else "no CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1, set before import)"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


if triton is not None:
    @triton.jit
    def _affine_combine(a1, b1, a2, b2):
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _first_order_kernel(a_ptr, b_ptr, h0_ptr, out_ptr, T, W, stride_t, stride_w, HAS_H0: tl.constexpr,
                            REVERSE: tl.constexpr, BT: tl.constexpr, BW: tl.constexpr):
        cols = tl.program_id(0) * BW + tl.arange(0, BW)
        cmask = cols < W
        if HAS_H0:
            carry = tl.load(h0_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BW], dtype=tl.float32)
        for t0 in range(0, T, BT):
            steps = t0 + tl.arange(0, BT)  # in scan order
            if REVERSE:
                rows = T - 1 - steps
            else:
                rows = steps
            m = (steps[:, None] < T) & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * stride_t + cols[None, :].to(tl.int64) * stride_w
            a = tl.load(a_ptr + offs, mask=m, other=1.0).to(tl.float32)
            b = tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32)
            A, B = tl.associative_scan((a, b), 0, _affine_combine)
            h = A * carry[None, :] + B
            tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=m)
            # steps past the end are identity steps, so the tile's last row is the carry out
            carry = tl.sum(tl.where(steps[:, None] == t0 + BT - 1, h, 0.0), 0)

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


def _require(x: torch.Tensor) -> None:
    ok, why = available(x.device)
    if not ok:
        raise RuntimeError(f"the Triton scan kernels cannot run here: {why}")


def triton_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, dim: int = 1,
                       reverse: bool = False, block_t: int = 64, block_w: int = 128) -> torch.Tensor:
    """All states of h_t = a_t h_{t-1} + b_t along `dim` (forward only; float32 accumulation).
    Same contract as wavefront.backends.linear_scan.linear_scan."""
    _require(a)
    if a.shape != b.shape or a.device != b.device:
        raise ValueError(f"a and b must have the same shape and device, got {tuple(a.shape)} on {a.device} and "
                         f"{tuple(b.shape)} on {b.device}")
    dim = time_dim(dim, a.dim())
    dtype = torch.promote_types(a.dtype, b.dtype)  # the output's, as in the reference
    if h0 is not None:  # the kernel takes its pointer: another device's memory would be read as this one's
        check_h0(h0, a, dim, dtype)
    T = a.shape[dim]
    W = a.numel() // T if T else 0
    if a.stride() != b.stride() or a.dtype != b.dtype:
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    out = torch.empty_like(a, dtype=dtype)
    if T == 0 or W == 0:
        return out
    try:  # time and one flattened channel dim as two strides: no copy for any dense layout
        x, y, o = (torch.movedim(t, dim, 0).view(T, W) for t in (a, b, out))
        if len({v.stride() for v in (x, y, o)}) != 1:
            raise RuntimeError("layouts differ")
    except RuntimeError:  # e.g. [B, T, C] along T: scan time-major copies, return a view of the result
        x, y = (torch.movedim(t, dim, 0).reshape(T, W).contiguous() for t in (a, b))
        o = torch.empty(T, W, dtype=dtype, device=a.device)  # written in place (a reshape's copy would not be)
        out = torch.movedim(o.view(T, *a.shape[:dim], *a.shape[dim + 1:]), 0, dim)
    h = h0.reshape(W).contiguous() if h0 is not None else x
    _first_order_kernel[(triton.cdiv(W, block_w),)](x, y, h, o, T, W, x.stride(0), x.stride(1), HAS_H0=h0 is not None,
                                                    REVERSE=reverse, BT=block_t, BW=block_w)
    return out


def triton_matrix_scan(q, k, v, decay=None, S0=None, form: str = "auto", chunk: int = 64, block_v: int = 64):
    """(o, last state) of S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (forward only), the
    contract of wavefront.models.scan_reference.matrix_scan_reference. form: "chunked" (additive or
    scalar decay), "recurrent" (any decay), "auto" (chunked where it applies)."""
    _require(q)
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
    DK, BV = _pow2(dk), min(_pow2(dv), _pow2(block_v))
    grid = (BH, triton.cdiv(dv, BV))
    if form == "chunked":
        _matrix_chunked_kernel[grid](qf, kf, vf, af, s0, o, sT, T, dk, dv, DECAY=kind, HAS_S0=S0 is not None,
                                     C=_pow2(chunk), DK=DK, BV=BV)
    elif form == "recurrent":
        _matrix_recurrent_kernel[grid](qf, kf, vf, af, s0, o, sT, T, dk, dv, DECAY=kind, HAS_S0=S0 is not None,
                                       DK=DK, BV=BV)
    else:
        raise ValueError(f"unknown form {form!r}: choose 'auto', 'chunked' or 'recurrent'")
    return o.reshape(*lead, T, dv), sT.reshape(*lead, dk, dv)


__all__ = ["available", "triton_linear_scan", "triton_matrix_scan"]
