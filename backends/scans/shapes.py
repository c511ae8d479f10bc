"""What every scan form shares: the time dim, the initial state, the compute dtype, native pointers."""
from __future__ import annotations

import operator

import torch


def time_dim(dim: int, ndim: int) -> int:
    """`dim` as an index in [0, ndim), refused like torch refuses it (IndexError, never wrapped:
    dim=5 on a 3-D tensor is a mistake, not dim 2).

    >>> time_dim(-1, 3), time_dim(2, 3)
    (2, 2)
    """
    dim = operator.index(dim)
    if ndim == 0:
        raise IndexError(f"Dimension specified as {dim} but tensor has no dimensions")
    if not -ndim <= dim < ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}], but got {dim})")
    return dim % ndim


def check_h0(h0: torch.Tensor, a: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> None:
    """Refuse an initial state that is not a without its time dim (`dim`, already in range) in
    shape, or not of `dtype` (default a's) on a's device: kernels read it as raw memory.

    >>> check_h0(torch.zeros(2, dtype=torch.float64), torch.zeros(2, 5), 1)
    Traceback (most recent call last):
    ValueError: h0 must match a's dtype and device (torch.float32 on cpu), got torch.float64 on cpu: pass h0.to(a)
    """
    want = a.shape[:dim] + a.shape[dim + 1:]
    if h0.shape != want:
        raise ValueError(f"h0 must have shape {tuple(want)} (a without its time dim), got {tuple(h0.shape)}")
    dtype = a.dtype if dtype is None else dtype
    if h0.dtype != dtype or h0.device != a.device:
        what, hint = ("a's dtype", "h0.to(a)") if dtype == a.dtype else ("the dtype of a and b promoted",
                                                                         f"h0.to({a.device}, {dtype})")
        raise ValueError(f"h0 must match {what} and device ({dtype} on {a.device}), got {h0.dtype} on {h0.device}: "
                         f"pass {hint}")


def compute_dtype(*tensors) -> torch.dtype:
    """float64 if any given tensor is float64, else float32 (float16/bfloat16 accumulate in float32).

    >>> compute_dtype(torch.ones(1, dtype=torch.bfloat16), None)
    torch.float32
    """
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def data_pointer(t: torch.Tensor | None):
    """A tensor's address for a native kernel, None (NULL) for an absent one.

    >>> data_pointer(None) is None
    True
    """
    return None if t is None else t.data_ptr()
