"""The public ARMT implementation's models, run with the client's own memory code.

The public code (AssociativeRecurrentWrapper -> AssociativeMemoryCell -> decoder layers wrapped
in AssociativeLayerWrapper) keeps each layer's memory in module attributes (W_mem, z, first_seg)
that its forward mutates segment by segment. The adapter runs that code as it is, with the state
made explicit: for each call it takes a private shallow copy of the layer wrapper (same class,
same parameter and submodule objects, so the weights are the model's, live) and calls the
client's own `associate` (read) or `update_mem` (write) with the cell's state tensors as its
W_mem / z / first_seg (with_state), then reads the new state back. Nothing is written into the user's modules,
and two threads never share a copy. What the adapter writes itself is only the glue the
wrapper's forward spells out: read added to the hidden states before the block (skipped on a
layer's first segment), the write from the block output's memory rows. The first-segment flag
is a tensor per cell (a batched step mixes first and later cells), so the client's write runs for
both values of first_seg and torch.where picks per row.

Every option and branch (n_heads, gating, use_denom, correction, L2-normalised features, with or
without the 1e-5) is the client's code running; the glue and the segment loop are proven equal to
the client's forward on a synthetic input at bind time (client_proof.py), with the memory
projections also drawn at random so that a zero-initialised W_mv cannot hide a difference.
"""
from __future__ import annotations

import copy
import functools
import types

import torch
from torch import nn
from wavefront.scheduler.bound_model import AdapterRefused, BoundModel
from wavefront.scheduler.client_proof import client_segment_len, prove_same_as_client

from wavefront.models.armt import ARMTCell
from wavefront.models.hf import HFBlockCall, HFEmbedStage, hf_parts
from wavefront.models.opaque import OpaqueModule

_WRAPPER_ATTRS = ("W_mq", "W_mk", "W_mv", "W_mb", "layer", "num_mem_tokens", "associate", "update_mem", "zero_mem")


# What the public ARMT code's own forward rewrites as it runs (the memory, its flags and counters):
# state, never settings, so a CaptureGuard ignores it.
CLIENT_STATE = frozenset({"W_mem", "z", "first_seg", "seg_num", "last_state", "previous_input", "remainders",
                          "n_updates", "segments_passed"})


def _client_layers(mc: nn.Module):
    """The memory cell's wrapped layers: `layers`, or what `get_layers()` returns (versions that keep
    the list out of the module tree)."""
    layers = getattr(mc, "layers", None)
    if layers is None and callable(getattr(mc, "get_layers", None)):
        layers = mc.get_layers()
    return layers


def _cls(obj) -> str:
    return type(obj).__name__


def memory_view(wrapper: nn.Module) -> nn.Module:
    """The client's layer wrapper without its decoder layer: the same class (its methods), its
    memory projections and attributes, for running associate / update_mem alone. A copy, so the
    wrapped layer is not a submodule twice (its parameters would be stacked twice); it stays
    reachable as a plain attribute (some versions' zero_mem reads its dtype)."""
    view = copy.copy(wrapper)
    layer = wrapper.layer
    view._modules = {k: m for k, m in wrapper._modules.items() if m is not layer}
    view.__dict__["layer"] = layer
    return view


class with_state:  # noqa: N801 (used like a function: with_state(view, W_mem, z, first).associate(h))
    """`self` for the client's memory methods, holding this call's state: W_mem, z and first_seg
    live here, every other attribute is the view's (its projections, phi, n_heads, ...), and the
    client's methods are bound to this object, so the state they assign lands here, never in the
    user's module, and concurrent calls never share it. (A plain object rather than a copy of the
    module: torch.export traces it inside a scan body, where copying a module is not traceable.)"""

    def __init__(self, view: nn.Module, W_mem, z, first: bool):
        d = self.__dict__
        d["_wf_view"], d["W_mem"], d["first_seg"] = view, W_mem, first
        if z is not None:
            d["z"] = z

    def __getattr__(self, name):
        view = self.__dict__["_wf_view"]
        for klass in type(view).__mro__:
            fn = klass.__dict__.get(name)
            if fn is not None:
                if isinstance(fn, types.FunctionType):  # the client's method, bound to this state
                    return functools.partial(fn, self)  # (not MethodType: torch.export's tracer cannot call it)
                break
        return getattr(view, name)


class ClientMemory(OpaqueModule):
    """The client's memory code on explicit state. write=False: associate(h), the memory's
    contribution for every row. write=True: update_mem(memory rows) for first_seg True and False,
    (W_mem, z) after a layer's first segment, then after a later one. (One module for both, so the
    projections are one layer's parameters once.)"""

    def __init__(self, view: nn.Module):
        super().__init__()
        self.mem = view

    def forward(self, x, W_mem, z, write: bool):
        if not write:
            return with_state(self.mem, W_mem, z, False).associate(x)
        out = []
        for first in (True, False):
            c = with_state(self.mem, W_mem, z, first)
            c.update_mem(x)
            out += [c.W_mem, c.z]
        return tuple(out)


class ClientState:
    """A layer's fresh memory: zeros shaped like the client's own zero_mem() state, per row."""

    def __init__(self, view: nn.Module):
        c = copy.copy(view)  # zero_mem assigns to it: a copy, not the user's module
        c._buffers = dict(view._buffers)
        c.zero_mem()
        self.shapes = (tuple(c.W_mem.shape[1:]), tuple(c.z.shape[1:]))

    def initial_state(self, batch, dtype, device):
        return tuple(torch.zeros(batch, *s, dtype=dtype, device=device) for s in self.shapes)


class ClientARMTLayer(nn.Module):
    """One layer cell around the client's wrapper: forward(h, W_mem, z, first, ctx) -> (h, W_mem, z)."""

    def __init__(self, wrapper: nn.Module, family: str):
        super().__init__()
        view = memory_view(wrapper)
        self.client_memory = ClientMemory(view)
        self.block = HFBlockCall(wrapper.layer, family)
        self.n_mem_tokens = wrapper.num_mem_tokens
        self.memory = ClientState(view)  # not a module: ARMTCell.initial_state asks it for zeros

    def forward(self, h, W_mem, z, first, ctx=()):
        h = torch.where(first, h, self.client_memory(h, W_mem, z, False) + h)  # associate(h) + h, not on the first
        h = self.block(h, ctx)
        W_first, z_first, W_next, z_next = self.client_memory(h[:, -self.n_mem_tokens:], W_mem, z, True)
        return h, torch.where(first, W_first, W_next), torch.where(first, z_first, z_next)


class PublishedARMTAdapter:
    """Models built with the public ARMT code, recognised by their structure (a wrapper holding a
    memory cell whose layers carry W_mq / W_mk / W_mv / W_mb around a decoder layer), run with
    the client's own memory code and proven equal to the client's forward before use."""

    name = "published-armt"

    def _memory_cell(self, model):
        mc = getattr(model, "memory_cell", None)
        if mc is None or not isinstance(getattr(model, "rmt_config", None), dict):
            return None
        layers = _client_layers(mc)
        if not isinstance(layers, nn.ModuleList) or not len(layers) or not hasattr(mc, "memory"):
            return None
        return mc if all(hasattr(layers[0], a) for a in ("W_mq", "W_mk", "W_mv", "W_mb", "layer")) else None

    def matches(self, model):
        return self._memory_cell(model) is not None

    def bind(self, model):
        mc = self._memory_cell(model)
        seg = client_segment_len(model, "ARMT")
        parts = hf_parts(mc.model)
        for i, w in enumerate(_client_layers(mc)):
            missing = [a for a in _WRAPPER_ATTRS if not hasattr(w, a)]
            if missing:
                raise AdapterRefused(f"layer {i} ({_cls(w)}) lacks {', '.join(missing)} of the ARMT layer wrapper")
            if getattr(w, "generate_mode", False):
                raise AdapterRefused(f"layer {i} is in generate mode (memory read-only): switch it off first")
            if not getattr(w, "use_denom", True):
                raise AdapterRefused(f"layer {i} has use_denom=False (no z state), which the adapter does not carry")
        try:  # the client's own zero_mem gives the state's shape: anything it raises is a refusal, not a crash
            layers = [ClientARMTLayer(w, parts.family) for w in _client_layers(mc)]
        except Exception as e:
            raise AdapterRefused(f"the client's layer wrapper could not be run on explicit state "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        mem_positions = "tail" if getattr(mc, "wrap_pos", False) else "continue"
        cell = ARMTCell(HFEmbedStage(parts, mem_positions), layers, parts.norm, parts.lm_head, mc.memory)
        what = f"published ARMT over {_cls(mc.model)}"
        memory_params = {n: p for n, p in model.named_parameters()
                         if any(f".{w}." in f".{n}" for w in ("W_mq", "W_mk", "W_mv", "W_mb"))}
        prove_same_as_client(what, model, cell, seg, parts.embed.num_embeddings, memory_params)
        return BoundModel(what, self.name, cell, seg, reference=lambda ids, memory=None: model(ids), volatile=CLIENT_STATE,
                          reference_takes_memory=False, source=model)
