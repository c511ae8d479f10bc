"""linear_scan: the first-order scan op the scan pass lowers to, with a small cost model.

Forms: "native" (the fused CPU kernel, native_scan.py), "triton" (the fused GPU kernel,
triton_scan.py, forward only), "chunked" (plain torch, any device and dtype, chunked_scan.py)
and "loop" (the reference, one step at a time). "auto" picks native where it applies (CPU
float32/64/complex, kernel built), triton on a CUDA device when no gradient is needed; otherwise
the loop when the sequence is short or every step is already a wide tensor op (the per-step
dispatch is amortised, so the chunked form's extra work would not pay), else the chunked form
with a chunk near sqrt(T).
"""
from __future__ import annotations

import math

import torch
import wavefront.backends.scans.linear.native as native_scan
import wavefront.backends.scans.linear.triton as triton_scan
from wavefront.backends.scans.linear.chunked import (
    chunked_linear_scan,
    exportable_linear_scan,
)
from wavefront.backends.scans.linear.naive import linear_scan_reference
from wavefront.backends.scans.shapes import check_h0, time_dim

METHODS = ("auto", "native", "triton", "chunked", "loop")
WIDE_STEP = 1 << 20  # elements per step above which a Python step's overhead is negligible


def needs_grad(*xs) -> bool:
    """Would autograd need gradients through these tensors (the Triton kernels are forward only)?"""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def choose_method(a: torch.Tensor, dim: int) -> tuple[str, int]:
    """(method, chunk) the cost model picks for scanning `a` along `dim`."""
    T = a.shape[dim]
    width = a.numel() // max(T, 1)
    if native_scan.supports(a):
        return "native", 0
    if a.is_cuda and not a.is_complex() and not needs_grad(a) and triton_scan.available(a.device)[0]:
        return "triton", 0
    if T <= 16 or width >= WIDE_STEP:
        return "loop", 0
    return "chunked", max(8, 1 << round(math.log2(math.sqrt(T))))


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, dim: int = 1,
                reverse: bool = False, method: str = "auto") -> torch.Tensor:
    """All states of h_t = a_t * h_{t-1} + b_t along `dim`; the last one is the final state. h0
    (zero by default) has a's shape without `dim`, the dtype of a and b and a's device.

    >>> a = torch.full((1, 4), 0.5); b = torch.ones(1, 4)
    >>> linear_scan(a, b), linear_scan(a, b, method="chunked")[:, -1]
    (tensor([[1.0000, 1.5000, 1.7500, 1.8750]]), tensor([1.8750]))
    """
    if method not in METHODS:
        raise ValueError(f"unknown scan method {method!r}: choose one of {list(METHODS)}")
    dim = time_dim(dim, a.dim())
    if h0 is not None:  # one contract whichever form runs (the native and Triton kernels read it as raw memory)
        check_h0(h0, a, dim, torch.promote_types(a.dtype, b.dtype))
    if torch.compiler.is_exporting():  # torch.export / ONNX: the chunked form with its carry in a scan op
        return exportable_linear_scan(a, b, h0, dim, reverse)
    chunk = 64  # for an explicit method="chunked"
    if method == "auto":
        method, chunk = choose_method(a, dim)
    if method == "native":
        return native_scan.native_linear_scan(a, b, h0, dim, reverse)
    if method == "triton":
        if needs_grad(a, b, h0):
            raise ValueError("method='triton' is forward only: use method='auto' or 'chunked' when gradients are needed")
        return triton_scan.triton_linear_scan(a, b, h0, dim, reverse)
    if method == "chunked":
        return chunked_linear_scan(a, b, h0, dim, reverse, chunk=chunk)
    return linear_scan_reference(a, b, h0, dim, reverse)
