"""Helpers to compare a fast path with its reference: relative error that reports itself."""
from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are all zero), computed in float64
    (complex128 for complex inputs).

    A NaN or an infinity anywhere, on either side, gives inf, so every `err <= tol` check fails:
    NaN == NaN would hide a broken reference, and an infinite scale would make any error 0.

    >>> rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    0.2
    >>> rel_err(torch.tensor([1 + 1j]), torch.tensor([1 + 2j])) > 0.4   # imaginary parts count
    True
    >>> rel_err(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("nan")]))
    inf
    >>> rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, float("inf")]))
    inf
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    wide = torch.complex128 if (actual.is_complex() or expected.is_complex()) else torch.float64
    a, e = actual.detach().to(wide), expected.detach().to(wide)
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return float("inf")
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, rtol: float, name: str = "output") -> float:
    """Assert rel_err(actual, expected) <= rtol, printing the error either way; returns it."""
    err = rel_err(actual, expected)
    print(f"{name}: rel err {err:.3e} (tolerance {rtol:.1e})")
    assert err <= rtol, f"{name}: relative error {err:.3e} exceeds {rtol:.1e}"
    return err
