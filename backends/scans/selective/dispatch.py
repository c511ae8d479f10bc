"""selective_scan: Mamba's selective scan, choosing its form (the native CPU kernel or the torch form)."""
from __future__ import annotations

import torch
import wavefront.backends.scans.selective.native as native_selective
from wavefront.backends.scans.selective.chunked import selective_scan_torch


def native_applies(u: torch.Tensor, *tensors) -> bool:
    """Whether the native kernel runs these inputs: float32/float64 CPU tensors of one dtype, a
    state the kernel holds (N <= MAX_STATE), the library built, and not under torch.export (a
    ctypes call cannot be traced)."""
    return (u.device.type == "cpu" and u.dtype in (torch.float32, torch.float64)
            and all(t is None or (t.dtype == u.dtype and t.device == u.device) for t in tensors)
            and tensors[1].shape[1] <= native_selective.MAX_STATE
            and not torch.compiler.is_exporting() and native_selective.library() is not None)


def selective_scan(u, delta, A, B, C, D=None, z=None, method: str = "auto"):
    """(y, last state) of Mamba's selective scan (wavefront.backends.scans.selective.naive has the
    math and shapes): the native kernel where it applies ("auto"), else the torch form.

    >>> y, h = selective_scan(torch.ones(1, 2, 3), torch.ones(1, 2, 3), -torch.ones(2, 4),
    ...                       torch.ones(1, 4, 3), torch.ones(1, 4, 3))
    >>> y.shape, h.shape
    (torch.Size([1, 2, 3]), torch.Size([1, 2, 4]))
    """
    if method == "auto":
        method = "native" if native_applies(u, delta, A, B, C, D, z) else "torch"
    if method == "native":
        return native_selective.selective_scan(u, delta, A, B, C, D, z)
    if method == "torch":
        return selective_scan_torch(u, delta, A, B, C, D, z)
    raise ValueError(f"unknown method {method!r}: choose 'auto', 'native' or 'torch'")


__all__ = ["native_applies", "selective_scan"]
