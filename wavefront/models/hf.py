"""ARMT around a Hugging Face decoder-only model: `wrap_armt`.

The decoder layers run unmodified (as opaque calls); wavefront supplies the segment loop, the
memory tokens, the per-segment position ids (restarting at 0), the causal mask and, for rotary
bases, the rotary tables. Two base layouts are recognised: LLaMA-like (`model.layers`,
`model.rotary_emb`, `model.norm`: LLaMA, Mistral, Qwen2, ...) and GPT-2-like (`transformer.h`,
`wte`, `wpe`, `ln_f`). Works with transformers 4.45+ and 5.x.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from wavefront.contract.kv_window import active_window
from wavefront.contract.segment import SegmentRecurrentLM

from .armt import ARMTCell, ARMTLayer
from .associative_memory import AssociativeMemory
from .opaque import OpaqueModule


@dataclass
class HFParts:
    family: str  # "llama" or "gpt2"
    layers: nn.ModuleList
    embed: nn.Embedding
    norm: nn.Module
    lm_head: nn.Module
    wpe: nn.Module | None = None
    drop: nn.Module | None = None
    rotary: nn.Module | None = None


def hf_parts(lm: nn.Module) -> HFParts:
    """Find the pieces of a Hugging Face causal LM that ARMT needs, or say which are missing."""
    base = getattr(lm, "base_model", None)
    if base is None or not hasattr(lm, "get_output_embeddings"):
        raise TypeError(f"{type(lm).__name__} is not a Hugging Face causal LM (no base_model / get_output_embeddings)")
    head = lm.get_output_embeddings()
    if hasattr(base, "layers") and hasattr(base, "rotary_emb") and hasattr(base, "norm"):
        return HFParts("llama", base.layers, base.get_input_embeddings(), base.norm, head, rotary=base.rotary_emb)
    if hasattr(base, "h") and hasattr(base, "wpe") and hasattr(base, "ln_f"):
        return HFParts("gpt2", base.h, base.wte, base.ln_f, head, wpe=base.wpe, drop=base.drop)
    raise TypeError(
        f"unsupported Hugging Face base {type(base).__name__}: wavefront knows LLaMA-like models "
        "(model.layers + model.rotary_emb + model.norm) and GPT-2-like models (transformer.h + wpe + ln_f)")


def causal_mask(t: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive causal mask [1, 1, t, t]: 0 where allowed, the dtype's minimum above the diagonal.
    Accepted by both eager and sdpa attention of every supported transformers version."""
    return torch.full((t, t), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)[None, None]


class HFEmbedStage(OpaqueModule):
    """Embeds a segment, appends memory tokens, builds the per-segment context for the blocks.

    Returns (h, mask, position_ids, cos, sin) for LLaMA-like bases and (h, mask) for GPT-2-like.
    `mem_positions="tail"` gives memory tokens the last rows of GPT-2's position table (the
    published implementation's wrap_pos); the default continues after the segment's tokens.
    """

    def __init__(self, parts: HFParts, mem_positions: str = "continue"):
        super().__init__()
        if mem_positions not in ("continue", "tail"):
            raise ValueError(f"mem_positions must be 'continue' or 'tail', got {mem_positions!r}")
        self.family, self.mem_positions = parts.family, mem_positions
        self.embed, self.wpe, self.drop, self.rotary = parts.embed, parts.wpe, parts.drop, parts.rotary
        self.n_ctx = 4 if parts.family == "llama" else 1

    def forward(self, input_ids, memory_tokens):
        x = self.embed(input_ids)
        b, n, m = x.shape[0], x.shape[1], memory_tokens.shape[0]
        h = torch.cat([x, memory_tokens.to(x.dtype).unsqueeze(0).expand(b, -1, -1)], dim=1)
        window = active_window()  # generate's cached decoding: these tokens continue the segment
        start = 0 if window is None else window.offset
        if self.mem_positions == "tail":
            p = self.wpe.weight.shape[0]
            pos = torch.cat([torch.arange(start, start + n, device=h.device),
                             torch.arange(p - m, p, device=h.device)])[None]
        else:
            pos = torch.arange(start, start + n + m, device=h.device)[None]
        mask = None if window is None else window.additive_mask(n + m, h.dtype, h.device)
        return self.context(h, pos, mask)

    def context(self, h, pos, mask=None):
        """(h, *ctx) for the blocks from the segment's rows and their positions: a causal mask
        (or the given one), and rotary tables (LLaMA-like) or learned positions added to h (GPT-2-like)."""
        mask = causal_mask(h.shape[1], h.dtype, h.device) if mask is None else mask
        if self.family == "llama":
            cos, sin = self.rotary(h, pos)
            return h, mask, pos, cos, sin
        h = self.drop(h + self.wpe(pos))
        return h, mask


class HFReadWriteEmbedStage(HFEmbedStage):
    """RMT's segment layout: [memory; tokens; memory] (read rows before the tokens, write rows
    after). Positions run on from 0, or with `write_offset` the write rows take positions
    write_offset.. (the published RMT's wrap_pos: a GPT-2 position table extended for memory)."""

    def __init__(self, parts: HFParts, write_offset: int | None = None):
        super().__init__(parts)
        self.write_offset = write_offset

    def forward(self, input_ids, memory):
        x = self.embed(input_ids)
        n, m = x.shape[1], memory.shape[1]
        mem = memory.to(x.dtype)
        h = torch.cat([mem, x, mem], dim=1)
        if self.write_offset is None:
            pos = torch.arange(n + 2 * m, device=h.device)[None]
        else:
            pos = torch.cat([torch.arange(n + m, device=h.device),
                             torch.arange(self.write_offset, self.write_offset + m, device=h.device)])[None]
        return self.context(h, pos)


class HFBlockCall(OpaqueModule):
    """Calls an unmodified Hugging Face decoder layer on (h, ctx) and returns the hidden states
    (transformers 4.x layers return a tuple, 5.x a tensor). Inside a key/value window (generate's
    cached decoding) the window goes in as the layer's cache, under the name its forward takes
    (`past_key_values` in 5.x, `past_key_value` in 4.x); a layer taking neither (4.x GPT-2's
    `layer_past` tuples) gets none, and the decoder's check then finds the window unused."""

    def __init__(self, layer: nn.Module, family: str):
        super().__init__()
        self.layer, self.family = layer, family
        params = inspect.signature(layer.forward).parameters
        self._cache_arg = next((n for n in ("past_key_values", "past_key_value") if n in params), None)

    def forward(self, h, ctx):
        window = active_window()
        cache = {self._cache_arg: window} if window is not None and self._cache_arg else {}
        if self.family == "llama":
            mask, pos, cos, sin = ctx
            out = self.layer(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin), use_cache=False,
                             **cache)
        else:
            out = self.layer(h, attention_mask=ctx[0], use_cache=False, **cache)
        return out[0] if isinstance(out, tuple) else out


def hf_armt_cell(parts: HFParts, memories: list[AssociativeMemory], memory_tokens: nn.Parameter,
                 mem_positions: str = "continue") -> ARMTCell:
    """The ARMT cell over a Hugging Face base, with the given per-layer memories."""
    n_mem = memory_tokens.shape[0]
    layers = [ARMTLayer(HFBlockCall(layer, parts.family), mem, n_mem) for layer, mem in zip(parts.layers, memories)]
    return ARMTCell(HFEmbedStage(parts, mem_positions), layers, parts.norm, parts.lm_head, memory_tokens)


class HFARMT(SegmentRecurrentLM):
    """ARMT over a Hugging Face causal LM (see wrap_armt). `hf_model` is the wrapped model."""

    def __init__(self, cell: ARMTCell, segment_len: int, hf_model: nn.Module):
        super().__init__(cell, segment_len)
        object.__setattr__(self, "hf_model", hf_model)  # shared modules live in `cell`; no second registration


def wrap_armt(hf_causal_lm: nn.Module, segment_len: int, n_mem_tokens: int, d_mem: int, nu: int = 3) -> HFARMT:
    """Make an ARMT from any supported Hugging Face decoder-only model (its layers untouched).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    >>> armt = wrap_armt(lm, segment_len=8, n_mem_tokens=2, d_mem=4)
    >>> armt(torch.randint(0, 64, (1, 20))).logits.shape
    torch.Size([1, 20, 64])
    """
    for name, v in (("segment_len", segment_len), ("n_mem_tokens", n_mem_tokens), ("d_mem", d_mem), ("nu", nu)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    parts = hf_parts(hf_causal_lm)
    if parts.wpe is not None and segment_len + n_mem_tokens > parts.wpe.weight.shape[0]:
        raise ValueError(f"segment_len + n_mem_tokens = {segment_len + n_mem_tokens} exceeds the base model's "
                         f"{parts.wpe.weight.shape[0]} learned positions: use a shorter segment")
    d_model = parts.embed.embedding_dim
    p = next(hf_causal_lm.parameters())
    memories = [AssociativeMemory(d_model, d_mem, nu).to(dtype=p.dtype, device=p.device) for _ in parts.layers]
    memory_tokens = nn.Parameter(torch.randn(n_mem_tokens, d_model, dtype=p.dtype, device=p.device)
                                 * parts.embed.weight.detach().std())
    return HFARMT(hf_armt_cell(parts, memories, memory_tokens), segment_len, hf_causal_lm)
