"""Helpers to compare a fast path with its reference: relative error that reports itself."""
from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are all zero), computed in float64
    (complex128 for complex inputs).

    >>> rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
    0.2
    >>> rel_err(torch.tensor([1 + 1j]), torch.tensor([1 + 2j])) > 0.4   # imaginary parts count
    True
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    wide = torch.complex128 if (actual.is_complex() or expected.is_complex()) else torch.float64
    a, e = actual.detach().to(wide), expected.detach().to(wide)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        return float("inf")
    a, e = a[~nan_a], e[~nan_e]
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, rtol: float, name: str = "output") -> float:
    """Assert rel_err(actual, expected) <= rtol, printing the error either way; returns it."""
    err = rel_err(actual, expected)
    print(f"{name}: rel err {err:.3e} (tolerance {rtol:.1e})")
    assert err <= rtol, f"{name}: relative error {err:.3e} exceeds {rtol:.1e}"
    return err
