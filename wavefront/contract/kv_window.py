"""A key/value window: how a segment cell runs the next few tokens of its current segment.

A segment's token rows never attend to the memory rows after them (causal attention), so the
logits of a segment's first n tokens depend only on those tokens and the memory before the
segment. Decoding therefore runs the model's own cell on the new tokens only, inside a window
that tells the cell's blocks three things: their rows start at position `offset` of the segment,
the keys/values of the segment's earlier `offset` tokens are cached (one entry per attention
call, in call order), and the first `keep` rows of this call are tokens whose keys/values join
the cache (the memory rows after them are recomputed each call: what they see grows with the
segment). The cell's memory output of such a call is the memory the segment would write if it
ended here, so when the segment is full it is the next segment's memory: a column of cells,
computed once.

The blocks that take a window: wavefront's DecoderBlock, and Hugging Face decoder layers through
HFBlockCall (their attention's `Cache.update` seam, fed a cache object that is this window).
A cell whose blocks ignore the window is found by the decoder's check against the cell's own
run of the same tokens (wavefront/kv_decode.py), never trusted blindly.

>>> w = KVWindow([], offset=0, keep=2)
>>> with w:
...     k, v = active_window().attend(torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4))
>>> k.shape, w.present[0][0].shape   # all 3 rows attend; the 2 token rows are cached
(torch.Size([1, 1, 3, 4]), torch.Size([1, 1, 2, 4]))
"""
from __future__ import annotations

import contextvars

import torch

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("wavefront_kv_window", default=None)


def active_window() -> "KVWindow | None":
    """The window the current call runs in (None outside generate's cached decoding, and inside
    code torch's dynamo traces: the segment program's scan body, which never decodes; dynamo
    cannot read a ContextVar)."""
    if torch.compiler.is_dynamo_compiling():
        return None
    return _ACTIVE.get()


class KVWindow:
    """past: one (keys, values) pair per attention call of the cell, in call order, each
    [..., offset, head_dim] along `seq_dim`; after the call, `present` holds them grown by the
    call's first `keep` rows."""

    def __init__(self, past: list, offset: int, keep: int, seq_dim: int = -2):
        self.past, self.offset, self.keep, self.seq_dim = list(past), offset, keep, seq_dim
        self.present: list = []
        self._token = None

    def __enter__(self):
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self._token)
        return False

    def positions(self, rows: int, device) -> torch.Tensor:
        """The segment positions of a call's rows: offset, offset + 1, ..."""
        return torch.arange(self.offset, self.offset + rows, device=device)

    def attend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values this call's rows attend to: the cached ones, then the call's own."""
        i = len(self.present)
        if i < len(self.past):
            keys = torch.cat([self.past[i][0], keys], dim=self.seq_dim)
            values = torch.cat([self.past[i][1], values], dim=self.seq_dim)
        elif self.offset:
            raise RuntimeError(f"the cell made attention call {i + 1}, but the cache holds {len(self.past)}: "
                               "its calls differ from the ones the segment began with")
        kept = self.offset + self.keep
        self.present.append((keys.narrow(self.seq_dim, 0, kept), values.narrow(self.seq_dim, 0, kept)))
        return keys, values

    def allowed(self, rows: int, device) -> torch.Tensor:
        """Bool [rows, offset + rows]: row i sees the cached rows and this call's rows up to i."""
        cols = torch.arange(self.offset + rows, device=device)
        return cols[None, :] <= self.positions(rows, device)[:, None]

    def additive_mask(self, rows: int, dtype: torch.dtype, device) -> torch.Tensor:
        """allowed() as Hugging Face layers take it: [1, 1, rows, offset + rows], 0 or the dtype's minimum."""
        zero = torch.zeros((), dtype=dtype, device=device)
        low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device)
        return torch.where(self.allowed(rows, device), zero, low)[None, None]

    # Hugging Face's Cache seam: a decoder layer's attention calls update(keys, values, layer_idx, ...)
    # and attends to what it returns. This window is that cache (call order, not layer_idx, picks the entry).
    def update(self, key_states, value_states, layer_idx=None, cache_kwargs=None):
        return self.attend(key_states, value_states)


class _TraceTimeWindow:
    """Stands in for the window while a cell is traced: code the trace runs through must not
    consult the window (the trace would bake in the answer it got then), so any use raises."""

    def __getattr__(self, name):
        raise RuntimeError(f"the code being traced consults the key/value window (.{name}) at trace time: "
                           "only modules the trace keeps as calls may consult it")


class window_at_trace_time:
    """Context for tracing code that decoding will later run inside a window: active_window()
    returns a stand-in that raises when used, so a trace that would bake the window in fails.

    >>> with window_at_trace_time():
    ...     active_window() is not None
    True
    """

    def __enter__(self):
        self._token = _ACTIVE.set(_TraceTimeWindow())
        return self

    def __exit__(self, *exc):
        _ACTIVE.reset(self._token)
        return False


def piece_offset(offset: int, n: int, segment_len: int, grow: bool = False) -> int:
    """Where a piece of n tokens starts in its segment, given `offset` tokens run so far (a full
    segment: 0, the next one); a piece longer than the segment has left is refused.

    >>> piece_offset(4, 2, 4), piece_offset(1, 3, 4)
    (0, 1)
    """
    if offset == segment_len and not grow:
        offset = 0
    if n < 1 or (not grow and n > segment_len - offset):
        raise ValueError(f"feed() takes 1 to {segment_len - offset} tokens here, got {n}")
    return offset


__all__ = ["KVWindow", "active_window", "piece_offset", "window_at_trace_time"]
