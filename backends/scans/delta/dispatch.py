"""delta_rule: the (gated) delta-rule op, choosing its form (the native CPU kernel or the chunked
torch form)."""
from __future__ import annotations

import torch
import wavefront.backends.scans.delta.native as native_delta
from wavefront.backends.scans.delta.chunked import SOLVES, chunked_delta_rule
from wavefront.backends.scans.linear.dispatch import needs_grad

METHODS = ("auto", "native", "chunked")


def delta_rule(q, k, v, beta, g=None, S0=None, method: str = "auto", solve: str = "triangular",
               chunk: int | None = None):
    """(o, last state) of the (gated) delta rule: for t = 1..T
        S <- exp(g_t) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T q_t
    (the contract of wavefront.backends.scans.delta.naive.delta_rule_reference).

    method "auto": the native CPU kernel when no gradient is needed and it applies (float32 /
    float64 CPU tensors), else the chunked torch form; "native" is forward only; "chunked" always
    the chunked form, with `solve` ("triangular" or "matmul") and `chunk` passed on. Under
    torch.export the chunked form with solve="matmul" is used (ONNX has no triangular solve, and
    the native kernel, a ctypes call, cannot be traced).

    >>> k = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> v = torch.tensor([[2.0], [3.0]])
    >>> delta_rule(k, k, v, torch.tensor([0.5, 0.5]))[0][:, 0]  # the native kernel
    tensor([1., 2.])
    >>> o, S = delta_rule(k, k, v, torch.tensor([0.5, 0.5]).requires_grad_())  # gradients: chunked
    >>> o[:, 0]
    tensor([1., 2.], grad_fn=<SelectBackward0>)
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose 'auto', 'native' or 'chunked'")
    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {SOLVES}, got {solve!r}")
    if torch.compiler.is_exporting() and method != "native":
        method, solve = "chunked", "matmul"
    if method == "auto":
        grad = needs_grad(q, k, v, beta, g, S0)
        method = "native" if not grad and native_delta.applies(q, k, v, beta, g, S0) else "chunked"
    if method == "native":
        if needs_grad(q, k, v, beta, g, S0):
            raise ValueError("method='native' is forward only: use method='auto' or 'chunked' when gradients are needed")
        return native_delta.native_delta_rule(q, k, v, beta, g, S0)
    return chunked_delta_rule(q, k, v, beta, g, S0, chunk=chunk, solve=solve)


__all__ = ["chunked_delta_rule", "delta_rule"]
