"""Helpers to compare a fast path with its reference: relative error that reports itself."""
from __future__ import annotations

from wavefront.contract.checks import rel_err

__all__ = ["assert_close", "rel_err"]


def assert_close(actual, expected, rtol: float, name: str = "output") -> float:
    """Assert rel_err(actual, expected) <= rtol, printing the error either way; returns it."""
    err = rel_err(actual, expected)
    print(f"{name}: rel err {err:.3e} (tolerance {rtol:.1e})")
    assert err <= rtol, f"{name}: relative error {err:.3e} exceeds {rtol:.1e}"
    return err
