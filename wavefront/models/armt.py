"""ARMT (Rodkin et al. 2024): per-layer associative memory around an unmodified decoder block.

`ARMT(ARMTConfig(...))` is the small dependency-free build; `wrap_armt` (hf.py) puts the same
cell around a Hugging Face decoder-only model. Both share ARMTLayer and ARMTCell, so they run the
same math (ARCHITECTURE.md, "ARMT, exactly").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from wavefront.contract.segment import SegmentCell, SegmentRecurrentLM

from .associative_memory import AssociativeMemory
from .config import StackConfig
from .decoder import DecoderBlock, RMSNorm


class ARMTLayer(nn.Module):
    """One ARMT layer cell: read memory -> decoder block -> write memory.

    forward(h, A, z, first, ctx=()) -> (h, A, z); `first` is a bool tensor (this layer's first
    segment: read skipped, v_prev = 0, gamma = 1).
    """

    def __init__(self, block: nn.Module, memory: AssociativeMemory, n_mem_tokens: int):
        super().__init__()
        self.block, self.memory, self.n_mem_tokens = block, memory, n_mem_tokens

    def forward(self, h, A, z, first, ctx=()):
        h = self.memory.read(h, A, z, first)
        h = self.block(h, ctx)
        A, z = self.memory.write(h[:, -self.n_mem_tokens:], A, z, first)
        return h, A, z


class TokenEmbedStage(nn.Module):
    """Embeds a segment's tokens and appends the memory tokens: (h,) with no extra context."""

    n_ctx = 0

    def __init__(self, embed: nn.Embedding):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids, memory_tokens):
        x = self.embed(input_ids)
        mem = memory_tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
        return (torch.cat([x, mem], dim=1),)


class ARMTCell(SegmentCell):
    """One segment through every ARMT layer. State: (A_0, z_0, A_1, z_1, ...).

    The embed stage returns (h, *ctx); ctx (masks, rotary tables of a Hugging Face base) is passed
    to every layer's block unchanged.
    """

    def __init__(self, embed_stage: nn.Module, layers: list[ARMTLayer], norm: nn.Module, lm_head: nn.Module,
                 memory_tokens: nn.Parameter):
        super().__init__()
        self.embed_stage = embed_stage
        self.layers = nn.ModuleList(layers)
        self.norm, self.lm_head = norm, lm_head
        self.memory = memory_tokens
        self.n_mem_tokens = memory_tokens.shape[0]
        self.n_ctx = embed_stage.n_ctx

    def initial_state(self, batch, dtype, device):
        state = []
        for layer in self.layers:
            state.extend(layer.memory.initial_state(batch, dtype, device))
        return tuple(state)

    def state_names(self):
        return tuple(f"{n}_{i}" for i in range(len(self.layers)) for n in ("A", "z"))

    def forward(self, input_ids, first, state):
        out = self.embed_stage(input_ids, self.memory)
        h = out[0]
        ctx = tuple(out[i] for i in range(1, 1 + self.n_ctx))
        new_state = []
        for i, layer in enumerate(self.layers):
            y = layer(h, state[2 * i], state[2 * i + 1], first, ctx)
            h = y[0]
            new_state += [y[1], y[2]]
        logits = self.lm_head(self.norm(h[:, :-self.n_mem_tokens]))
        return logits, tuple(new_state)


@dataclass
class ARMTConfig(StackConfig):
    """Size of a standalone ARMT. `d_ff_per_layer` builds a hybrid stack (layers of different width)."""

    d_mem: int = 16
    nu: int = 3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    d_ff_per_layer: tuple[int, ...] | None = field(default=None)

    def __post_init__(self):
        super().__post_init__()
        if self.d_ff_per_layer is not None and len(self.d_ff_per_layer) != self.n_layers:
            raise ValueError(f"d_ff_per_layer has {len(self.d_ff_per_layer)} entries for {self.n_layers} layers")


class ARMT(SegmentRecurrentLM):
    """Standalone ARMT language model (LLaMA-style blocks).

    >>> model = ARMT(ARMTConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, segment_len=4, n_mem_tokens=2, d_mem=4))
    >>> out = model(torch.randint(0, 256, (1, 10)))
    >>> out.logits.shape, out.memory.segments_seen
    (torch.Size([1, 10, 256]), 3)
    """

    def __init__(self, config: ARMTConfig):
        c = config
        embed = nn.Embedding(c.vocab_size, c.d_model)
        widths = c.d_ff_per_layer or (c.d_ff,) * c.n_layers
        layers = [ARMTLayer(DecoderBlock(c.d_model, c.n_heads, w, c.rope_theta, c.norm_eps),
                            AssociativeMemory(c.d_model, c.d_mem, c.nu), c.n_mem_tokens) for w in widths]
        memory = nn.Parameter(torch.randn(c.n_mem_tokens, c.d_model) * embed.weight.detach().std())
        cell = ARMTCell(TokenEmbedStage(embed), layers, RMSNorm(c.d_model, c.norm_eps),
                        nn.Linear(c.d_model, c.vocab_size, bias=False), memory)
        super().__init__(cell, c.segment_len)
        self.config = config
