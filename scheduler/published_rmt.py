"""The public RMT implementation's models (memory tokens from the top layer into the next segment).

The public code (RecurrentWrapper -> MemoryCell around a Hugging Face causal LM) runs, per
segment, the whole base model on [memory; tokens; memory] and takes the next segment's memory from
the last hidden state's final rows. The adapter builds the same segment cell over the base
model's own decoder layers, so capture sees the layers and the state edge from the top layer of
segment s to the first layer of segment s + 1: diagonal batching is refused naming that edge,
and schedule="sequential" runs it, proven equal to the client's forward at bind time.
"""
from __future__ import annotations

from torch import nn
from wavefront.scheduler.bound_model import AdapterRefused, BoundModel
from wavefront.scheduler.client_proof import client_segment_len, prove_same_as_client

from wavefront.contract.segment import SegmentCell
from wavefront.models.hf import HFBlockCall, HFReadWriteEmbedStage, hf_parts


class _BlockLayer(nn.Module):
    """A decoder layer as a segment-cell layer: forward(h, ctx) -> h (the block stays one call)."""

    def __init__(self, layer: nn.Module, family: str):
        super().__init__()
        self.block = HFBlockCall(layer, family)

    def forward(self, h, ctx=()):
        return self.block(h, ctx)


class ReadWriteMemoryCell(SegmentCell):
    """One RMT segment over a Hugging Face base: [memory; tokens; memory] through every layer, the
    final norm, logits of the token rows; state: the normed write rows (the next memory)."""

    def __init__(self, parts, memory_tokens: nn.Parameter, write_offset: int | None):
        super().__init__()
        self.embed_stage = HFReadWriteEmbedStage(parts, write_offset)
        self.layers = nn.ModuleList(_BlockLayer(layer, parts.family) for layer in parts.layers)
        self.norm, self.lm_head, self.memory = parts.norm, parts.lm_head, memory_tokens
        self.n_mem_tokens, self.n_ctx = memory_tokens.shape[0], self.embed_stage.n_ctx

    def initial_state(self, batch, dtype, device):
        return (self.memory.to(dtype=dtype, device=device).unsqueeze(0).expand(batch, -1, -1),)

    def state_names(self):
        return ("memory_tokens",)

    def forward(self, input_ids, first, state):
        out = self.embed_stage(input_ids, state[0])
        h = out[0]
        ctx = tuple(out[i] for i in range(1, 1 + self.n_ctx))
        for layer in self.layers:
            h = layer(h, ctx)
        h = self.norm(h)
        m = self.n_mem_tokens
        return self.lm_head(h[:, m:-m]), (h[:, -m:],)


class PublishedRMTAdapter:
    """Models built with the public RMT code, recognised by their structure: a wrapper with
    rmt_config['segment_size'] holding a memory cell that has a base `model`, a `memory`
    parameter [M, d] and a forward taking `memory_state`."""

    name = "published-rmt"

    def _memory_cell(self, model):
        mc = getattr(model, "memory_cell", None)
        if mc is None or not isinstance(getattr(model, "rmt_config", None), dict):
            return None
        if not isinstance(getattr(mc, "memory", None), nn.Parameter) or not hasattr(mc, "model"):
            return None
        import inspect
        try:
            takes_state = "memory_state" in inspect.signature(mc.forward).parameters
        except (TypeError, ValueError):
            return None
        return mc if takes_state else None

    def matches(self, model):
        return self._memory_cell(model) is not None

    def bind(self, model):
        mc = self._memory_cell(model)
        seg = client_segment_len(model, "RMT")
        parts = hf_parts(mc.model)
        m = mc.memory.shape[0]
        write_offset = None
        if getattr(mc, "wrap_pos", False):
            if parts.family != "gpt2" or not isinstance(getattr(mc, "old_num_pos", None), int):
                raise AdapterRefused("wrap_pos=True needs a GPT-2-like base with the cell's old_num_pos")
            write_offset = mc.old_num_pos + m
        cell = ReadWriteMemoryCell(parts, mc.memory, write_offset)
        what = f"published RMT over {type(mc.model).__name__}"
        prove_same_as_client(what, model, cell, seg, parts.embed.num_embeddings)
        return BoundModel(what, self.name, cell, seg, reference=lambda ids, memory=None: model(ids),
                          reference_takes_memory=False, source=model)
