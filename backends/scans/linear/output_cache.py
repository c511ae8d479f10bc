"""A small cache of large CPU output buffers that their users have dropped, for the native scan.

A fresh multi-MB tensor costs its first touch: the kernel zeroes every page (64 MB: ~9 ms in
huge pages here, a third of a 256 x 64k scan). Like torch's CUDA caching allocator, this keeps
a few buffers and hands them out again once torch has freed them. Bounded by
WAVEFRONT_SCAN_CACHE_MB (default 256; 0 turns it off); clear_output_cache() empties it.

Why reuse is airtight: the cache owns each buffer's memory (an anonymous mapping) and lends it
to torch through a memoryview that only the tensor's storage references; torch drops that
reference when it frees the storage's memory, and only then does a weak-reference callback mark
the buffer free. So anything that keeps the storage alive keeps the buffer busy: tensors, views,
storage objects (`t.untyped_storage()`), tensors saved by autograd, `t.numpy()`, DLPack capsules.
`share_memory_()` (also done by torch.multiprocessing queues) moves the data into a new shared
segment and frees the old memory: the other process maps that segment, never the cache's buffer.
(A use count cannot prove this: torch keeps one Python storage object per storage, which the
cache and the user would share, and another process's mappings are counted nowhere.)
One difference from torch.empty: a cached output's storage cannot grow (resize_ to more bytes).

>>> import torch
>>> a = torch.zeros(1024, 1024)
>>> cache = OutputCache()
>>> h = cache.empty_like(a, torch.empty_like)  # 4 MB: a cached buffer
>>> ptr, st = h.data_ptr(), h.untyped_storage(); del h
>>> cache.empty_like(a, torch.empty_like).data_ptr() == ptr  # `st` still reaches it: another one
False
>>> del st; cache.empty_like(a, torch.empty_like).data_ptr() == ptr  # now freed: reused
True
"""
from __future__ import annotations

import math
import mmap
import os
import threading
import weakref

import torch

MIN_BYTES = 4 << 20  # smaller buffers are cheap to touch: never cached
ENV = "WAVEFRONT_SCAN_CACHE_MB"


class _Buffer:
    """One cached allocation, `busy` from being handed out until torch frees the storage on it."""

    def __init__(self, nbytes: int):
        # private anonymous memory, zeroed lazily by the kernel like a fresh malloc (and copied on
        # fork, never shared with a child); huge pages make its first touch 3x cheaper
        self.mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
        try:
            self.mm.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):  # not Linux, or THP off: only slower
            pass
        self.nbytes, self.busy, self._lent = nbytes, False, None

    def lend(self, dtype: torch.dtype, shape) -> torch.Tensor:
        view = memoryview(self.mm)  # after this call, referenced by the storage alone
        self._lent = weakref.ref(view, self._freed)
        self.busy = True
        flat = torch.frombuffer(view, dtype=dtype, count=self.nbytes // dtype.itemsize)
        return flat.resize_(shape)  # same bytes: reshaped in place, not a view (custom Functions return it)

    def _freed(self, _ref) -> None:  # runs when torch drops the memoryview; takes no lock
        self.busy = False


class OutputCache:
    def __init__(self):
        self._lock = threading.Lock()
        self._buffers: list[_Buffer] = []  # least recently lent first

    @staticmethod
    def limit_bytes() -> int:
        raw = os.environ.get(ENV, "256")
        try:
            mb = float(raw)
        except ValueError:
            mb = math.nan
        if not (math.isfinite(mb) and mb >= 0):
            raise ValueError(f"{ENV} must be a number of megabytes (0 turns the cache off), got {raw!r}")
        return int(mb * 2**20)

    def empty_like(self, a: torch.Tensor, fresh) -> torch.Tensor:
        """A contiguous uninitialised tensor shaped like `a`: a freed cached buffer of the same
        size if there is one, else a new cached one while the limit allows, else fresh(a)."""
        limit = self.limit_bytes()  # read on every call: a bad setting fails at once, not only on large outputs
        nbytes = a.numel() * a.element_size()
        if nbytes < MIN_BYTES or nbytes > limit or a.device.type != "cpu":
            return fresh(a)
        with self._lock:
            buf = next((x for x in self._buffers if not x.busy and x.nbytes == nbytes), None)
            if buf is not None:
                self._buffers.remove(buf)
            else:
                free = [x for x in self._buffers if not x.busy]
                while free and self.cached_bytes + nbytes > limit:
                    self._buffers.remove(free.pop(0))  # unmapped now: nothing lent from it is alive
                if self.cached_bytes + nbytes > limit:
                    return fresh(a)
                buf = _Buffer(nbytes)
            self._buffers.append(buf)
            return buf.lend(a.dtype, a.shape)

    def clear(self) -> None:
        """Forget every buffer: free ones are unmapped now, lent ones when torch frees them."""
        with self._lock:
            self._buffers.clear()

    @property
    def cached_bytes(self) -> int:
        return sum(x.nbytes for x in self._buffers)


OUTPUTS = OutputCache()


def clear_output_cache() -> None:
    """Release the native scan's cached output buffers."""
    OUTPUTS.clear()
