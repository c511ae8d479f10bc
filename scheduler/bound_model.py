"""BoundModel: a model as an adapter sees it; AdapterRefused: recognised, but not run exactly."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class AdapterRefused(TypeError):
    """An adapter recognised the model but cannot run it exactly (the message says what differs):
    optimize() then leaves the model as it is and explain() gives the reason."""


@dataclass
class BoundModel:
    """A model seen through an adapter: its cell (sharing the model's parameters), segment length,
    and the user's own forward as the reference every check compares with.

    reference(input_ids, memory) -> what the user's model returns for that call (a SegmentLMOutput,
    an output with .logits, or the logits); `reference_takes_memory` False: the model's own forward
    starts from fresh memory only, so calls continuing a stream cannot be compared with it.
    `source`: the module the user passed (what a CaptureGuard watches); `volatile`: names of
    attributes the model's own code rewrites as it runs (state, not settings: never guarded).
    """

    family: str
    adapter: str
    cell: nn.Module
    segment_len: int
    reference: object = None
    reference_takes_memory: bool = True
    source: nn.Module | None = None
    volatile: frozenset = frozenset()
