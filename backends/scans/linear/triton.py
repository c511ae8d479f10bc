"""The Triton kernel for the first-order scan h_t = a_t h_{t-1} + b_t (forward only).

One program per block of channels walks time in tiles of BT steps; inside a tile an associative
scan of the (a, b) pairs (tl.associative_scan), across tiles one carry per channel in registers.
Reads a and b once, writes h once, accumulates in float32. On CPU it runs under
TRITON_INTERPRET=1 (tests, at tiny shapes); on a GPU it compiles.
"""
from __future__ import annotations

import torch
from wavefront.backends.scans.shapes import check_h0, time_dim
from wavefront.backends.scans.triton_support import available, require, tl, triton

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


def triton_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, dim: int = 1,
                       reverse: bool = False, block_t: int = 64, block_w: int = 128) -> torch.Tensor:
    """All states of h_t = a_t h_{t-1} + b_t along `dim` (forward only; float32 accumulation).
    Same contract as wavefront.backends.scans.linear.dispatch.linear_scan."""
    require(a)
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


__all__ = ["available", "triton_linear_scan"]
