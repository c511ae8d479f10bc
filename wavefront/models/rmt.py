"""RMT (Bulatov et al. 2022): the next segment's memory tokens are the top layer's output.

The negative case for every pass: edge (L-1, s) -> (0, s+1) makes the critical path L * S, so
diagonal batching is illegal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wavefront.contract.segment import SegmentCell, SegmentRecurrentLM

from .config import StackConfig
from .decoder import DecoderBlock, RMSNorm


class RMTCell(SegmentCell):
    """One segment: [tokens; memory tokens] through every block; state = the top layer's memory rows."""

    def __init__(self, embed, layers, norm, lm_head, memory_tokens: nn.Parameter):
        super().__init__()
        self.embed, self.layers, self.norm, self.lm_head = embed, nn.ModuleList(layers), norm, lm_head
        self.memory = memory_tokens
        self.n_mem_tokens = memory_tokens.shape[0]

    def initial_state(self, batch, dtype, device):
        return (self.memory.to(dtype=dtype, device=device).unsqueeze(0).expand(batch, -1, -1),)

    def state_names(self):
        return ("memory_tokens",)

    def forward(self, input_ids, first, state):
        h = torch.cat([self.embed(input_ids), state[0]], dim=1)
        for layer in self.layers:
            h = layer(h)
        logits = self.lm_head(self.norm(h[:, :-self.n_mem_tokens]))
        return logits, (h[:, -self.n_mem_tokens:],)


@dataclass
class RMTConfig(StackConfig):
    """Size of an RMT (same fields as the shared stack config)."""


class RMT(SegmentRecurrentLM):
    """Recurrent Memory Transformer (memory passed from the top layer to the next segment's input).

    >>> model = RMT(RMTConfig(n_layers=2, d_model=16, n_heads=2, d_ff=32, segment_len=4, n_mem_tokens=2))
    >>> model(torch.randint(0, 256, (1, 9))).logits.shape
    torch.Size([1, 9, 256])
    """

    def __init__(self, config: RMTConfig):
        c = config
        embed = nn.Embedding(c.vocab_size, c.d_model)
        memory = nn.Parameter(torch.randn(c.n_mem_tokens, c.d_model) * embed.weight.detach().std())
        layers = [DecoderBlock(c.d_model, c.n_heads, c.d_ff) for _ in range(c.n_layers)]
        cell = RMTCell(embed, layers, RMSNorm(c.d_model), nn.Linear(c.d_model, c.vocab_size, bias=False), memory)
        super().__init__(cell, c.segment_len)
        self.config = config
