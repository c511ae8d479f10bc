"""matrix_scan: the matrix-state scan op, choosing its form (the native CPU kernel, the Triton
kernels or the chunked torch form)."""
from __future__ import annotations

import wavefront.backends.scans.matrix.native as native_matrix
import wavefront.backends.scans.matrix.triton as triton_matrix
from wavefront.backends.scans.linear.dispatch import needs_grad
from wavefront.backends.scans.matrix.chunked import chunked_matrix_scan


def matrix_scan(q, k, v, decay=None, S0=None, method: str = "auto"):
    """(o, last state) of S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t. When no gradient
    is needed ("auto"): the native kernel on the CPU for a scalar (or no) decay, the Triton
    kernels on a CUDA device; else the chunked torch form.

    >>> import torch
    >>> o, S = matrix_scan(torch.ones(1, 3, 2), torch.ones(1, 3, 2), torch.ones(1, 3, 4))
    >>> o[0, :, 0]
    tensor([2., 4., 6.])
    """
    if method == "auto":
        grad = needs_grad(q, k, v, decay, S0)
        method = "native" if not grad and native_matrix.applies(q, k, v, decay, S0) else \
            "triton" if q.is_cuda and not grad and triton_matrix.available(q.device)[0] else "chunked"
    if method == "native":
        if needs_grad(q, k, v, decay, S0):
            raise ValueError("method='native' is forward only: use method='auto' or 'chunked' when gradients are needed")
        return native_matrix.native_matrix_scan(q, k, v, decay, S0)
    if method == "triton":
        if needs_grad(q, k, v, decay, S0):
            raise ValueError("method='triton' is forward only: use method='auto' or 'chunked' when gradients are needed")
        return triton_matrix.triton_matrix_scan(q, k, v, decay, S0)
    if method == "chunked":
        return chunked_matrix_scan(q, k, v, decay, S0)
    raise ValueError(f"unknown method {method!r}: choose 'auto', 'native', 'triton' or 'chunked'")


__all__ = ["chunked_matrix_scan", "matrix_scan"]
