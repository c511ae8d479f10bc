"""A chunked first-order scan in plain torch: any device and dtype, autograd for free.

The T steps are cut into chunks of length C. Inside a chunk, Hillis-Steele doubling combines
(a, b) pairs in log2(C) vectorised steps (the affine maps compose: (a1, b1) then (a2, b2) =
(a1 a2, a2 b1 + b2)); across chunks, one carry per chunk runs in order. So T sequential steps
become log2(C) + T / C, each over whole tensors. Products only, never log-space cumsums (those
overflow or underflow past a few hundred steps). Low-precision inputs accumulate in float32.
"""
from __future__ import annotations

import torch
from wavefront.backends.scans.shapes import check_h0, time_dim


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def chunked_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, dim: int = 1,
                        reverse: bool = False, chunk: int = 64) -> torch.Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t along `dim` (see linear_scan_reference).

    >>> a = torch.full((1, 5), 0.5); b = torch.ones(1, 5)
    >>> chunked_linear_scan(a, b, chunk=2)
    tensor([[1.0000, 1.5000, 1.7500, 1.8750, 1.9375]])
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dim = time_dim(dim, a.dim())
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    if h0 is not None:  # broadcasting or a cast would hide a wrong h0
        check_h0(h0, a, dim, out_dtype)
    ct = _compute_dtype(out_dtype)
    x = torch.movedim(a.to(ct), dim, 0)
    y = torch.movedim(b.to(ct), dim, 0)
    if reverse:
        x, y = x.flip(0), y.flip(0)
    T = x.shape[0]
    n_chunks = (T + chunk - 1) // chunk  # not -(-T // C): ONNX divides truncating toward zero
    pad = n_chunks * chunk - T
    if pad:  # identity steps (a = 1, b = 0) after the end change nothing before it
        x = torch.cat([x, torch.ones((pad, *x.shape[1:]), dtype=ct, device=x.device)])
        y = torch.cat([y, torch.zeros((pad, *y.shape[1:]), dtype=ct, device=y.device)])
    A = x.reshape(n_chunks, chunk, *x.shape[1:])
    B = y.reshape(n_chunks, chunk, *y.shape[1:])
    step = 1
    while step < chunk:  # inclusive prefix composition inside every chunk at once
        A_prev, B_prev = A[:, :-step], B[:, :-step]
        B = torch.cat([B[:, :step], A[:, step:] * B_prev + B[:, step:]], dim=1)
        A = torch.cat([A[:, :step], A[:, step:] * A_prev], dim=1)
        step *= 2
    carry = torch.zeros_like(B[0, 0]) if h0 is None else h0.to(ct)
    outs = []
    for c in range(n_chunks):  # h inside chunk c = A_cum * (state entering the chunk) + B_cum
        h = A[c] * carry + B[c]
        outs.append(h)
        carry = h[-1]
    h = torch.cat(outs)[:T]
    if reverse:
        h = h.flip(0)
    return torch.movedim(h, 0, dim).to(out_dtype)


def exportable_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, dim: int = 1,
                           reverse: bool = False, chunk: int = 64) -> torch.Tensor:
    """The chunked scan in a form torch.export keeps dynamic in T (for ONNX export): padding by a
    ceil-divided chunk count, the prefix composition inside chunks as whole-tensor ops, and the
    carry across chunks in torch's scan higher-order op (an ONNX Scan over T / chunk steps),
    never a Python loop over a length.

    >>> a = torch.full((1, 5), 0.5); b = torch.ones(1, 5)
    >>> exportable_linear_scan(a, b, chunk=2)
    tensor([[1.0000, 1.5000, 1.7500, 1.8750, 1.9375]])
    """
    from torch._higher_order_ops.scan import scan
    dim = time_dim(dim, a.dim())
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    ct = _compute_dtype(out_dtype)
    x, y = torch.movedim(a.to(ct), dim, 0), torch.movedim(b.to(ct), dim, 0)
    if reverse:
        x, y = x.flip(0), y.flip(0)
    T, rest = x.shape[0], x.shape[1:]
    n = (T + chunk - 1) // chunk  # not (-T) % chunk: modulo guards make torch.export give up on T
    pad = n * chunk - T
    x = torch.cat([x, x.new_ones((pad, *rest))]).reshape(n, chunk, *rest)
    y = torch.cat([y, y.new_zeros((pad, *rest))]).reshape(n, chunk, *rest)
    step = 1
    while step < chunk:  # a Python loop over log2(chunk), a constant: fine to unroll
        y = torch.cat([y[:, :step], x[:, step:] * y[:, :-step] + y[:, step:]], dim=1)
        x = torch.cat([x[:, :step], x[:, step:] * x[:, :-step]], dim=1)
        step *= 2

    def across(carry, xy):
        h = xy[0] * carry + xy[1]
        return h[-1].clone(), h.clone()

    carry = torch.zeros(rest, dtype=ct, device=x.device) if h0 is None else h0.to(ct)
    _, h = scan(across, carry, (x, y))
    h = h.reshape(n * chunk, *rest)[:T]
    if reverse:
        h = h.flip(0)
    return torch.movedim(h, 0, dim).to(out_dtype)
