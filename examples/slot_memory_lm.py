"""Your own segment-recurrent model, written the natural way, under diagonal batching.

Nothing here is ARMT: each layer owns a slot memory (K slots and their gate mass) that its
tokens read by attention before the layer and rewrite with a gated average after it. The cell
keeps one (slots, mass) pair per layer and walks `zip(self.layers, state)`; wavefront captures
that code as it is, proves the memory flows layer l -> layer l only, and runs the stack under
the diagonal schedule, exactly.

    python examples/slot_memory_lm.py [--segments 32]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wavefront.contract.segment import SegmentCell, SegmentRecurrentLM


class SlotMemoryLayer(nn.Module):
    """Read the slots, a causal self-attention block, then write the slots.

    forward(h [B, T, d], memory (slots [B, K, d], mass [B, K]), first) -> (h, (slots, mass))
    """

    def __init__(self, d: int, n_heads: int, n_slots: int, d_ff: int):
        super().__init__()
        self.n_heads = n_heads
        self.read_q, self.read_out = nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.write_gate = nn.Linear(d, n_slots)

    def forward(self, h, memory, first):
        slots, mass = memory
        scores = self.read_q(h) @ slots.transpose(1, 2) / slots.shape[-1] ** 0.5
        read = self.read_out(torch.softmax(scores, dim=-1) @ slots)
        h = h + torch.where(first, torch.zeros_like(read), read)  # nothing to read before the first write
        B, T, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(B, T, d))
        h = h + self.ff2(F.silu(self.ff1(self.norm2(h))))
        gate = torch.sigmoid(self.write_gate(h)).transpose(1, 2)  # [B, K, T]
        new_mass = mass + gate.sum(-1)
        slots = (slots * mass.unsqueeze(-1) + gate @ h) / new_mass.unsqueeze(-1)
        return h, (slots, new_mass)


class SlotMemoryCell(SegmentCell):
    """One segment through every layer; state: a (slots, mass) pair per layer."""

    def __init__(self, vocab_size: int, d: int, n_layers: int, n_heads: int, n_slots: int, d_ff: int,
                 segment_len: int):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab_size, d), nn.Embedding(segment_len, d)
        self.layers = nn.ModuleList(SlotMemoryLayer(d, n_heads, n_slots, d_ff) for _ in range(n_layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab_size, bias=False)
        self.n_slots = n_slots

    def initial_state(self, batch, dtype, device):
        d = self.embed.embedding_dim
        return [(torch.zeros(batch, self.n_slots, d, dtype=dtype, device=device),
                 torch.zeros(batch, self.n_slots, dtype=dtype, device=device)) for _ in self.layers]

    def forward(self, input_ids, first, state):
        h = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        new_state = []
        for layer, memory in zip(self.layers, state):
            h, memory = layer(h, memory, first)
            new_state.append(memory)
        return self.head(self.norm(h)), new_state


def slot_memory_lm(n_layers=8, d=32, n_heads=4, n_slots=4, d_ff=64, segment_len=16, vocab_size=128,
                   dtype=torch.float32, seed=0) -> SegmentRecurrentLM:
    """A small slot-memory LM with random weights (nothing downloaded).

    >>> model = slot_memory_lm(n_layers=2)
    >>> model(torch.randint(0, 128, (1, 40))).logits.shape
    torch.Size([1, 40, 128])
    """
    torch.manual_seed(seed)
    return SegmentRecurrentLM(SlotMemoryCell(vocab_size, d, n_layers, n_heads, n_slots, d_ff, segment_len),
                              segment_len).to(dtype).eval()


if __name__ == "__main__":
    import argparse
    import time

    import wavefront
    from wavefront.testing import rel_err

    ap = argparse.ArgumentParser()
    ap.add_argument("--segments", type=int, default=32)
    args = ap.parse_args()
    model = slot_memory_lm()
    fast = wavefront.optimize(model, verify=True)  # raises if the first call differs from the model's forward
    ids = torch.randint(0, 128, (1, args.segments * 16))
    with torch.inference_mode():
        fast(ids), model(ids)  # warm-up (and the one-time verification)
        t0 = time.perf_counter()
        ref = model(ids)
        t1 = time.perf_counter()
        out = fast(ids)
        t2 = time.perf_counter()
    print(wavefront.explain(fast))
    print(f"sequential {1e3 * (t1 - t0):.1f} ms, diagonal {1e3 * (t2 - t1):.1f} ms, "
          f"speedup {(t1 - t0) / (t2 - t1):.2f}x, rel err {rel_err(out.logits, ref.logits):.1e}")
