"""Small modules written the way users write recurrences: a Python loop over time. They are the
inputs of the time-loop lifting pass (wavefront.time_loops.model) in tests, benchmarks and examples;
their own forward is the reference."""
from __future__ import annotations

import torch
from torch import nn


class MinGRU(nn.Module):
    """minGRU (Feng et al. 2024): h_t = (1 - z_t) h_{t-1} + z_t h~_t with z_t, h~_t from x_t alone,
    so the loop is affine in h. Outputs are appended to a list, as users often write it.

    >>> MinGRU(4)(torch.randn(2, 7, 4)).shape
    torch.Size([2, 7, 4])
    """

    def __init__(self, d: int):
        super().__init__()
        self.lin_z, self.lin_h = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
        outs = []
        for t in range(x.shape[1]):
            z = torch.sigmoid(self.lin_z(x[:, t]))
            h = (1 - z) * h + z * self.lin_h(x[:, t])
            outs.append(h)
        return torch.stack(outs, 1)


class LinearRecurrence(nn.Module):
    """A gated linear recurrence (HGRN / RG-LRU family): h_t = a_t h_{t-1} + (1 - a_t) W x_t with
    a_t = sigmoid(G x_t), each h_t written into a preallocated output (the form that exports).

    >>> LinearRecurrence(4)(torch.randn(2, 7, 4)).shape
    torch.Size([2, 7, 4])
    """

    def __init__(self, d: int):
        super().__init__()
        self.gate, self.proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
        out = torch.zeros_like(x)
        for t in range(x.shape[1]):
            a = torch.sigmoid(self.gate(x[:, t]))
            h = a * h + (1 - a) * self.proj(x[:, t])
            out[:, t] = h
        return out


class ElmanRNN(nn.Module):
    """h_t = tanh(W h_{t-1} + x_t): the carry enters a matmul and a tanh, so it is not a scan
    (wavefront reports why and leaves the loop as it is).

    >>> ElmanRNN(4)(torch.randn(2, 7, 4)).shape
    torch.Size([2, 4])
    """

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Linear(d, d)

    def forward(self, x):
        h = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype, device=x.device)
        for t in range(x.shape[1]):
            h = torch.tanh(self.w(h) + x[:, t])
        return h


__all__ = ["MinGRU", "LinearRecurrence", "ElmanRNN"]


class GatedLinearAttention(nn.Module):
    """Linear attention with a matrix state per head, written as a loop: S_t = g_t S_{t-1} +
    k_t v_t^T, o_t = S_t^T q_t. decay: "none" (g = 1: plain linear attention), "scalar" (one gate
    per head: RetNet / Lightning / Mamba-2 style) or "per_dim" (a gate per key dim: GLA).

    >>> GatedLinearAttention(8, 2, 4)(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, decay: str = "scalar"):
        super().__init__()
        if decay not in ("none", "scalar", "per_dim"):
            raise ValueError(f"decay must be 'none', 'scalar' or 'per_dim', got {decay!r}")
        self.n_heads, self.d_head, self.decay = n_heads, d_head, decay
        self.q, self.k, self.v = (nn.Linear(d_model, n_heads * d_head, bias=False) for _ in range(3))
        self.g = nn.Linear(d_model, n_heads * (d_head if decay == "per_dim" else 1))
        self.o = nn.Linear(n_heads * d_head, d_model, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        H, D = self.n_heads, self.d_head
        q, k, v = (f(x).view(B, T, H, D) for f in (self.q, self.k, self.v))
        k = k / D ** 0.5
        g = torch.sigmoid(self.g(x)).view(B, T, H, -1, 1)  # [B, T, H, 1 or D, 1]
        S = x.new_zeros(B, H, D, D)
        out = x.new_empty(B, T, H, D)
        if self.decay == "none":
            for t in range(T):
                S = S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
                out[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
        else:
            for t in range(T):
                S = g[:, t] * S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
                out[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
        return self.o(out.reshape(B, T, H * D))


class DeltaNet(nn.Module):
    """DeltaNet (Yang et al. 2024) written as a loop: per head, S <- a_t S (gated: a_t = sigmoid(...),
    one gate per head and step; else a_t = 1), then S <- S + beta_t k_t (v_t - S^T k_t)^T and o_t = S^T q_t,
    with l2-normalised keys and beta_t = sigmoid(...). The update is affine in S (S times the
    data matrix I - beta k k^T), not elementwise.

    >>> DeltaNet(8, 2, 4)(torch.randn(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, gated: bool = False):
        super().__init__()
        self.n_heads, self.d_head, self.gated = n_heads, d_head, gated
        self.q, self.k, self.v = (nn.Linear(d_model, n_heads * d_head, bias=False) for _ in range(3))
        self.b = nn.Linear(d_model, n_heads)
        self.g = nn.Linear(d_model, n_heads)
        self.o = nn.Linear(n_heads * d_head, d_model, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        H, D = self.n_heads, self.d_head
        q, k, v = (f(x).view(B, T, H, D).transpose(1, 2) for f in (self.q, self.k, self.v))  # [B, H, T, D]
        k = torch.nn.functional.normalize(k, dim=-1)
        beta = torch.sigmoid(self.b(x)).transpose(1, 2)  # [B, H, T]
        a = torch.sigmoid(self.g(x)).transpose(1, 2) if self.gated else torch.ones_like(beta)
        S = x.new_zeros(B, H, D, D)
        out = x.new_empty(B, H, T, D)
        for t in range(T):
            S = a[:, :, t, None, None] * S
            kt = k[:, :, t]
            err = v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, kt)
            S = S + beta[:, :, t, None, None] * kt.unsqueeze(-1) * err.unsqueeze(-2)
            out[:, :, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, :, t])
        return self.o(out.transpose(1, 2).reshape(B, T, H * D))
