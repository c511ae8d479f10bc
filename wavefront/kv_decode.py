"""Cached decoding of a segment model's current segment: the model's own cell, run on the new
tokens only, inside a key/value window (wavefront/contract/kv_window.py).

`CachedSegmentDecoder.check()` proves, once per cell and dtype, that the cell honours the window:
the same tokens run as one segment and as pieces of 1, 1 and the rest must give the same logits
and the same written memory (the cell's own run is the reference, at verify's tolerance), from
fresh memory and from a written one. A cell whose blocks ignore the window (a block that takes
no cache, transformers 4.x GPT-2's `layer_past` tuples) fails that check and generate() runs the
current segment whole per token instead, with the reason kept in `reason`.

A call that leaves its segment unfinished runs the cell traced with its logits as its only output
(wavefront/scheduler/logits_only.py: the memory write it would discard left out); the call that
fills the segment runs the cell itself, whose written memory the next segment reads. The check
runs both (pieces 1 and 1 leave the segment open, the rest fills it); a cell that does not trace
so decodes through the cell itself, `logits_only_reason` saying why.

>>> import torch
>>> from wavefront.models import ARMT, ARMTConfig
>>> armt = ARMT(ARMTConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, segment_len=4, n_mem_tokens=2, d_mem=4))
>>> decoder = CachedSegmentDecoder(armt.cell, 4)
>>> decoder.check(torch.float32, "cpu")
True
"""
from __future__ import annotations

import threading

import torch

from wavefront.contract.checks import VerificationError, check_outputs
from wavefront.contract.kv_window import KVWindow, piece_offset
from wavefront.contract.segment import MemoryState, as_memory_tensors
from wavefront.scheduler.capture import CaptureError
from wavefront.scheduler.logits_only import logits_only_cell
from wavefront.scheduler.train_mode import reads_training

# hooks registered for every module (torch.nn.modules.module.register_module_forward_hook, ...)
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    if hasattr(torch.nn.modules.module, name))


def _has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


class CachedSegmentDecoder:
    """Cached decoding for one segment cell: `check()` once, then one `stream()` per generate call."""

    def __init__(self, cell, segment_len: int):
        self.cell, self.segment_len = cell, segment_len
        self._checked: dict = {}  # (dtype, device) -> bool
        self._refused: dict = {}  # (dtype, device) -> why cached decoding differs there
        self.logits_only, self.logits_only_reason, self._traced = None, "", False  # traced on the first check
        self._lock = threading.RLock()  # one check at a time: a graph is handed out only once proven

    @property
    def reason(self) -> str:
        """Why cached decoding is not used, per dtype and device it was refused for ("" when it
        is used everywhere it was checked, or nothing was checked yet)."""
        return "; ".join(f"{dtype} on {device}: {why}" for (dtype, device), why in self._refused.items())

    def stream(self, memory: MemoryState | None, batch: int, dtype, device, grow: bool = False) -> "DecodeStream":
        """A stream starting at the segment after `memory` (None: fresh memory of `batch` rows);
        grow=True: one segment that grows past segment_len, its memory read, never written (the
        public ARMT client's generate)."""
        if memory is None:
            memory = MemoryState(as_memory_tensors(self.cell.initial_state(batch, dtype, device)), 0)
        return DecodeStream(self.cell, self.segment_len, memory, grow, self._logits_only_now())

    def _logits_only_now(self):
        """The proven logits-only graph, unless what it leaves out could matter now: a module whose
        code reads the train/eval flag trains (dropout draws, batch-norm statistics), or a module
        the trace ran through has hooks (the trace ran its forward, not its hooks), or hooks are
        registered for every module."""
        graph = self.logits_only
        if graph is None:
            return None
        if any(m.training and reads_training(m) for m in self.cell.modules()):
            return None
        if any(_GLOBAL_HOOKS) or any(_has_hooks(m) for m in graph.traced_modules):
            return None
        return graph

    # -- the proof --------------------------------------------------------------------------
    def check(self, dtype, device) -> bool:
        """Whether cached decoding gives the cell's own results for this dtype (checked once)."""
        key = (dtype, str(device))
        with self._lock:
            return self._check(key, dtype, device)

    def _check(self, key, dtype, device) -> bool:
        if key not in self._checked:
            if not self._traced:
                self._traced = True
                try:
                    self.logits_only = logits_only_cell(self.cell)
                except CaptureError as e:
                    self.logits_only_reason = str(e)
            try:
                with torch.no_grad():
                    self._prove(dtype, device)
                self._checked[key] = True
            except Exception as e:  # any failure means: run the segment whole, and say why
                if self.logits_only is not None:  # prove the cell itself (every call) before giving up the cache
                    self.logits_only, self.logits_only_reason = None, f"its decode calls differ from the cell's: {e}"
                    self._checked.clear()  # what was proven ran the traced cell: prove again without it
                    return self._check(key, dtype, device)
                self._refused[key] = f"cached decoding differs from the cell's own run of a segment: {e}"
                self._checked[key] = False
        return self._checked[key]

    def _prove(self, dtype, device) -> None:
        seg = self.segment_len
        state = self.cell.initial_state(1, dtype, device)
        probe = torch.zeros(1, seg, dtype=torch.long, device=device)
        vocab = self.cell(probe, torch.tensor(True, device=device), state)[0].shape[-1]
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 1, seg), generator=gen).to(device)
        pieces = [p for p in (1, 1, seg - 2) if p > 0][:seg]
        for s in range(2):  # a first segment, then one reading the memory the first wrote
            start = MemoryState(as_memory_tensors(state), s)
            want_logits, state = self.cell(ids[s], torch.tensor(s == 0, device=device), state)
            # the graph proven too, whatever the modules' modes are now (stream() may leave it out)
            stream, got, at = DecodeStream(self.cell, seg, start, False, self.logits_only), [], 0
            for n in pieces:
                got.append(stream.feed(ids[s][:, at:at + n]))
                at += n
            check_outputs((torch.cat(got, dim=1), stream.memory.tensors), (want_logits, state),
                          f"segment {s} decoded in pieces {pieces}")


class DecodeStream:
    """One generate call's position in the stream: the memory before the current segment, the
    segment's cached keys/values, and how many of its tokens have run.

    feed(ids) runs the next tokens and returns their logits; when the segment is full, `memory`
    is the memory it wrote and the next feed starts the next segment.
    """

    def __init__(self, cell, segment_len: int, memory: MemoryState, grow: bool = False, logits_only=None):
        self.cell, self.segment_len, self.memory, self.grow = cell, segment_len, memory, grow
        self.logits_only = logits_only  # the cell without its write, for calls that leave the segment open
        self._cache, self._offset, self._written = [], 0, None

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, n, vocab] of the next n tokens of the stream (n <= what the segment has
        left, unless the stream grows)."""
        n = ids.shape[1]
        self._offset = piece_offset(self._offset, n, self.segment_len, self.grow)
        if self._offset == 0:  # a segment starts (after a full one, its written memory is self.memory)
            self._cache = []
        first = torch.tensor(self.memory.segments_seen == 0, device=ids.device)
        fills = self._offset + n == self.segment_len and not self.grow
        with KVWindow(self._cache, self._offset, n) as window:
            if fills or self.logits_only is None:
                logits, written = self.cell(ids, first, self.memory.tensors)
            else:
                logits = self.logits_only(ids, first, self.memory.tensors)
        if not window.present:
            raise VerificationError("no block of the cell took the key/value window")
        self._cache, self._offset = window.present, self._offset + n
        if fills:
            self.memory = MemoryState(as_memory_tensors(written), self.memory.segments_seen + 1)
        return logits


__all__ = ["CachedSegmentDecoder", "DecodeStream"]
