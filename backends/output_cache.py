"""A small cache of large CPU output buffers that their users have dropped, for the native scan.

A fresh multi-MB tensor costs its first touch: the kernel zeroes every page (64 MB: ~9 ms in
huge pages here, a third of a 256 x 64k scan). Like torch's CUDA caching allocator, this keeps
a few dropped buffers and hands them out again; a buffer is reused only when nothing but the
cache references its storage (no tensor, view or autograd graph). Bounded by
WAVEFRONT_SCAN_CACHE_MB (default 256; 0 turns it off); clear_output_cache() empties it.
"""
from __future__ import annotations

import os
import threading

import torch

MIN_BYTES = 4 << 20  # smaller buffers are cheap to touch: never cached


def _use_count(storage) -> int | None:
    try:
        return torch._C._storage_Use_Count(storage._cdata)
    except (AttributeError, RuntimeError):  # a torch without it: the cache stays off
        return None


class OutputCache:
    def __init__(self):
        self._lock = threading.Lock()
        self._storages: list = []

    @staticmethod
    def limit_bytes() -> int:
        return int(float(os.environ.get("WAVEFRONT_SCAN_CACHE_MB", "256")) * 2**20)

    def empty_like(self, a: torch.Tensor, fresh) -> torch.Tensor:
        """A contiguous uninitialised tensor shaped like `a`: a dropped cached buffer of the same
        size if there is one, else fresh(a) (then cached while the limit allows)."""
        nbytes = a.numel() * a.element_size()
        if nbytes < MIN_BYTES or a.device.type != "cpu":
            return fresh(a)
        limit = self.limit_bytes()
        if nbytes > limit:
            return fresh(a)
        with self._lock:
            for st in self._storages:
                if st.nbytes() == nbytes and _use_count(st) == 1:
                    return torch.empty(0, dtype=a.dtype).set_(st, 0, a.shape)  # contiguous strides
            h = fresh(a)
            st = h.untyped_storage()
            if _use_count(st) is None:
                return h
            free = [s for s in self._storages if _use_count(s) == 1]
            while free and self.cached_bytes + nbytes > limit:
                self._storages.remove(free.pop(0))  # drop the oldest unused buffers first
            if self.cached_bytes + nbytes <= limit:
                self._storages.append(st)
            return h

    def clear(self) -> None:
        with self._lock:
            self._storages.clear()

    @property
    def cached_bytes(self) -> int:
        return sum(s.nbytes() for s in self._storages)


OUTPUTS = OutputCache()


def clear_output_cache() -> None:
    """Release the native scan's cached output buffers."""
    OUTPUTS.clear()
