"""verify=True: compare an optimized call's outputs with the reference's, by dtype tolerance."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

VERIFY_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class VerificationError(AssertionError):
    """optimize(..., verify=True): the optimized call differs from the sequential reference."""


def check_outputs(out, ref, what: str, rtol: float | None = None) -> None:
    """Raise VerificationError if any floating tensor in `out` differs from its twin in `ref`
    by more than `rtol` (default: its dtype's tolerance; relative error, see wavefront.testing.rel_err).

    >>> check_outputs((torch.ones(2),), (torch.ones(2),), "a copy")
    """
    from wavefront.testing import rel_err
    got = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    want = [t for t in tree_leaves(ref) if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    if len(got) != len(want):
        raise VerificationError(f"{what}: {len(got)} output tensors, the reference has {len(want)}")
    for k, (a, b) in enumerate(zip(got, want)):
        err, tol = rel_err(a, b), rtol if rtol is not None else VERIFY_RTOL.get(a.dtype, 1e-4)
        if err > tol:
            raise VerificationError(f"{what} differs from the reference: max relative error {err:.3e} > {tol:.1e} "
                                    f"(output tensor {k} of shape {tuple(a.shape)})")
