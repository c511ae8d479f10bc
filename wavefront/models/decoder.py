"""A small dependency-free LLaMA-style decoder block (RMSNorm, RoPE attention, SwiGLU MLP).

Positions restart at 0 for every call, as ARMT's segments do. Fully traceable by torch.fx: no
shape-dependent Python control flow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wavefront.contract.kv_window import active_window


class RMSNorm(nn.Module):
    """Root-mean-square norm. >>> RMSNorm(4)(torch.ones(1, 4)).shape
    torch.Size([1, 4])
    """

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention + SwiGLU block. forward(h, ctx=()) -> h.

    `ctx` is the per-segment context some bases need (masks, rotary tables); this block
    computes its own and ignores it. Inside a key/value window (generate's cached decoding,
    wavefront/contract/kv_window.py) its rows start at the window's offset and attend to the
    cached keys/values too.

    >>> DecoderBlock(16, 2, 32)(torch.randn(1, 5, 16)).shape
    torch.Size([1, 5, 16])
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, rope_theta: float = 10000.0, eps: float = 1e-6):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        self.attn_norm = RMSNorm(d_model, eps)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp_norm = RMSNorm(d_model, eps)
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        inv_freq = 1.0 / rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, h, ctx=()):
        b, t = h.shape[0], h.shape[1]
        x = self.attn_norm(h)
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        window = active_window()
        if window is None:
            pos = torch.arange(t, device=h.device, dtype=torch.float64)
        else:
            pos = window.positions(t, h.device).to(torch.float64)
        angles = torch.outer(pos, self.inv_freq)
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if window is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = window.attend(k, v)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=window.allowed(t, h.device))
        h = h + self.o_proj(a.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        x = self.mlp_norm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
