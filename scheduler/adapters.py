"""How model families plug into capture: an adapter turns a model into a segment cell.

A segment cell is an nn.Module with `layers` (nn.ModuleList), `initial_state(batch, dtype,
device)` and forward(input_ids, first, state) -> (logits, tuple(new_state)). wavefront's own
models already are one; adapters make one for foreign code, sharing its modules and weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn

from wavefront.models.associative_memory import AssociativeMemory
from wavefront.models.hf import hf_armt_cell, hf_parts
from wavefront.models.segment import SegmentRecurrentLM


@dataclass
class BoundModel:
    """A model seen through an adapter: its cell (sharing the model's parameters) and segment length."""

    family: str
    adapter: str
    cell: nn.Module
    segment_len: int


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
        return BoundModel(type(model).__name__, self.name, model.cell, model.segment_len)


def _cls(obj) -> str:
    return type(obj).__name__


class PublishedARMTAdapter:
    """The public ARMT implementation (AssociativeRecurrentWrapper -> AssociativeMemoryCell ->
    layers wrapped in AssociativeLayerWrapper), recognised by duck typing so a model trained
    with that code runs as it is, weights and all. Its in-module memory (W_mem, z) is not used:
    the wrapper starts every call from zero memory, and so does the captured cell."""

    name = "published-armt"
    layer_attrs = ("W_mq", "W_mk", "W_mv", "W_mb", "W_mem", "z", "layer", "num_mem_tokens")

    def _memory_cell(self, model):
        if _cls(model) == "AssociativeRecurrentWrapper" and hasattr(model, "memory_cell"):
            return model.memory_cell
        return None

    def matches(self, model):
        cell = self._memory_cell(model)
        return (cell is not None and _cls(cell) == "AssociativeMemoryCell"
                and all(hasattr(cell, a) for a in ("model", "memory", "layers", "num_mem_tokens")))

    def bind(self, model):
        mc = self._memory_cell(model)
        seg = (getattr(model, "rmt_config", None) or {}).get("segment_size")
        if not isinstance(seg, int) or seg < 1:
            raise TypeError("AssociativeRecurrentWrapper has no rmt_config['segment_size']: cannot tell the segment length")
        align = model.rmt_config.get("segment_alignment")
        if align not in (None, "left"):
            raise TypeError(f"segment_alignment={align!r} is not supported (only left-aligned segments, the default)")
        parts = hf_parts(mc.model)
        memories = []
        for i, w in enumerate(mc.layers):
            missing = [a for a in self.layer_attrs if not hasattr(w, a)]
            if _cls(w) != "AssociativeLayerWrapper" or missing:
                raise TypeError(f"layer {i} is {_cls(w)}, not an AssociativeLayerWrapper with {', '.join(missing or self.layer_attrs)}")
            if not getattr(w, "correction", True):
                raise TypeError(f"layer {i} has correction=False; only the default gamma correction is supported")
            nu = getattr(getattr(w, "phi", None), "nu", 3)
            memories.append(AssociativeMemory.from_modules(w.W_mq, w.W_mk, w.W_mv, w.W_mb, nu))
        wrapped = nn.ModuleList(w.layer for w in mc.layers)
        parts.layers = wrapped
        mem_positions = "tail" if getattr(mc, "wrap_pos", False) else "continue"
        cell = hf_armt_cell(parts, memories, mc.memory, mem_positions)
        return BoundModel(f"published ARMT over {_cls(mc.model)}", self.name, cell, seg)


_ADAPTERS: list = [SegmentModelAdapter(), PublishedARMTAdapter()]


def register_adapter(adapter: RecurrenceAdapter, *, first: bool = True) -> None:
    """Teach capture a new model family. Adapters are tried in order; `first` puts this one in front."""
    _ADAPTERS.insert(0 if first else len(_ADAPTERS), adapter)


def segment_adapter_for(model: nn.Module) -> RecurrenceAdapter | None:
    """The first adapter that recognises `model` as segment-recurrent, or None."""
    return next((a for a in _ADAPTERS if a.matches(model)), None)


def bind_model(model: nn.Module) -> BoundModel:
    """The first matching adapter's view of `model`, or an error listing what is supported."""
    if isinstance(model, BoundModel):
        return model
    for adapter in _ADAPTERS:
        if adapter.matches(model):
            return adapter.bind(model)
    names = ", ".join(a.name for a in _ADAPTERS)
    raise TypeError(f"no wavefront adapter recognises {type(model).__name__} (tried: {names}). Build it from "
                    "wavefront.models, or register_adapter() one that returns its segment cell")
