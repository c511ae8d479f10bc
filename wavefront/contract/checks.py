"""How every check compares a fast result with its reference: relative error, the tolerance
per dtype that verify=True uses, and the error it raises."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

VERIFY_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


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


class VerificationError(AssertionError):
    """optimize(..., verify=True): the optimized call differs from the sequential reference."""


def check_outputs(out, ref, what: str, rtol: float | None = None, at_least: torch.dtype | None = None) -> None:
    """Raise VerificationError if any floating tensor in `out` differs from its twin in `ref`
    by more than `rtol` (default: its dtype's tolerance, or `at_least`'s when that is looser: a
    computation done in a less precise dtype; relative error, see rel_err).

    >>> check_outputs((torch.ones(2),), (torch.ones(2),), "a copy")
    """
    got = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    want = [t for t in tree_leaves(ref) if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    if len(got) != len(want):
        raise VerificationError(f"{what}: {len(got)} output tensors, the reference has {len(want)}")
    for k, (a, b) in enumerate(zip(got, want)):
        tol = rtol if rtol is not None else max(VERIFY_RTOL.get(d, 1e-4) for d in (a.dtype, at_least or a.dtype))
        err = rel_err(a, b)
        if err > tol:
            raise VerificationError(f"{what} differs from the reference: max relative error {err:.3e} > {tol:.1e} "
                                    f"(output tensor {k} of shape {tuple(a.shape)})")
