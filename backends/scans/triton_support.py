"""What every Triton scan kernel needs: triton itself if installed, where it can run, block sizes."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the extra is not installed: available() says so
    triton = tl = None


def available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """(can the Triton kernels run on `device`?, why not)."""
    if triton is None:
        return False, "triton is not installed (pip install 'wavefront[triton]')"
    if torch.device(device).type == "cuda":
        return (torch.cuda.is_available(), "" if torch.cuda.is_available() else "no CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "Triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1, set before import)"


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def require(x: torch.Tensor) -> None:
    ok, why = available(x.device)
    if not ok:
        raise RuntimeError(f"the Triton scan kernels cannot run here: {why}")


__all__ = ["available", "pow2", "require", "tl", "triton"]
