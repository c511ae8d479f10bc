"""Sizes shared by the layer-stack-over-segments models."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class StackConfig:
    """A decoder stack run over segments with memory tokens appended to each segment."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 128
    segment_len: int = 32
    n_mem_tokens: int = 8

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v < 1:
                raise ValueError(f"{type(self).__name__}.{f.name} must be >= 1, got {v}")
