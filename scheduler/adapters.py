"""How model families plug into capture: an adapter turns a model into a segment cell.

A segment cell is an nn.Module with `layers` (nn.ModuleList), `initial_state(batch, dtype,
device)` and forward(input_ids, first, state) -> (logits, tuple(new_state)). wavefront's own
models already are one; adapters make one for foreign code, sharing its modules and weights.
"""
from __future__ import annotations

from typing import Protocol

from torch import nn
from wavefront.scheduler.bound_model import AdapterRefused, BoundModel  # noqa: F401 (re-exported)
from wavefront.scheduler.published_armt import PublishedARMTAdapter
from wavefront.scheduler.published_rmt import PublishedRMTAdapter

from wavefront.contract.segment import SegmentRecurrentLM


class RecurrenceAdapter(Protocol):
    name: str

    def matches(self, model: nn.Module) -> bool: ...

    def bind(self, model: nn.Module) -> BoundModel: ...


class SegmentModelAdapter:
    """wavefront's own models (ARMT, wrap_armt's HFARMT, RMT and any SegmentRecurrentLM)."""

    name = "wavefront"

    def matches(self, model):
        return isinstance(model, SegmentRecurrentLM)

    def bind(self, model):
        return BoundModel(type(model).__name__, self.name, model.cell, model.segment_len, reference=model, source=model)


_ADAPTERS: list = [SegmentModelAdapter(), PublishedARMTAdapter(), PublishedRMTAdapter()]


def register_adapter(adapter: RecurrenceAdapter, *, first: bool = True) -> None:
    """Teach capture a new model family. Adapters are tried in order; `first` puts this one in front."""
    _ADAPTERS.insert(0 if first else len(_ADAPTERS), adapter)


def segment_adapter_for(model: nn.Module) -> RecurrenceAdapter | None:
    """The first adapter that recognises `model` as segment-recurrent, or None."""
    return next((a for a in _ADAPTERS if a.matches(model)), None)


def adapter_names() -> list[str]:
    """The registered segment adapters' names, in the order they are tried."""
    return [a.name for a in _ADAPTERS]


def bind_model(model: nn.Module) -> BoundModel:
    """The first matching adapter's view of `model`, or an error listing what is supported."""
    if isinstance(model, BoundModel):
        return model
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter.bind(model)
    names = ", ".join(adapter_names())
    raise TypeError(f"no wavefront adapter recognises {type(model).__name__} (tried: {names}). Build it from "
                    "wavefront.models, or register_adapter() one that returns its segment cell")
