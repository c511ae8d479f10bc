"""causal-conv1d's two functions (causal_conv1d_fn, causal_conv1d_update) in torch, any device.

A depthwise causal convolution is one grouped F.conv1d: torch's own kernel already does it well,
so these only give it causal-conv1d's signatures and semantics (initial and final states, the
in-place rolling state of the decode step, silu/swish activation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from wavefront.kernels.unsupported import Unsupported

ACTIVATIONS = (None, "silu", "swish")


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    return x if activation is None else F.silu(x)


def _check(x: torch.Tensor, weight: torch.Tensor, activation: str | None) -> None:
    """Before anything is computed or written (the decode step rolls its state in place)."""
    if activation not in ACTIVATIONS:
        raise Unsupported(f"activation must be one of {ACTIVATIONS} (causal-conv1d's), got {activation!r}")
    if weight.dim() != 2 or x.dim() not in (2, 3) or x.shape[1] != weight.shape[0]:
        raise ValueError(f"causal conv1d takes x [batch, dim, seqlen] (or [batch, dim] for an update) and weight "
                         f"[dim, width]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """causal-conv1d's causal_conv1d_fn: out[:, :, t] = sum_w weight[:, w] * x[:, :, t - width + 1 + w]
    (+ bias), inputs before the start read from `initial_states` [batch, dim, width - 1] (zeros if None).
    Returns out [batch, dim, seqlen] in x's dtype, and with return_final_states the last width - 1
    inputs (the state a following call continues from).

    >>> x = torch.arange(4.0).reshape(1, 1, 4)
    >>> causal_conv1d_fn(x, torch.tensor([[1.0, 1.0]]))
    tensor([[[0., 1., 3., 5.]]])
    """
    _check(x, weight, activation)
    if seq_idx is not None:
        raise Unsupported("seq_idx (packed sequences) is not supported by wavefront's causal_conv1d_fn: "
                         "run each sequence as its own batch row")
    width = weight.shape[1]
    dtype = x.dtype
    xs = x.to(weight.dtype)
    if initial_states is None:
        padded = F.pad(xs, (width - 1, 0))
    else:
        padded = torch.cat([initial_states.to(xs.dtype), xs], dim=-1)
    out = F.conv1d(padded, weight.unsqueeze(1), bias, groups=x.shape[1])
    out = _activate(out, activation).to(dtype)
    if not return_final_states:
        return out
    final = padded[..., padded.shape[-1] - (width - 1):].to(dtype)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """causal-conv1d's decode step: x [batch, dim] or [batch, dim, seqlen] continues from
    conv_state [batch, dim, state_len] (the last inputs, state_len >= width - 1), which is
    rolled in place; returns the outputs like x.

    >>> state = torch.zeros(1, 1, 1)
    >>> [causal_conv1d_update(torch.tensor([[v]]), state, torch.tensor([[1.0, 1.0]])).item() for v in (1.0, 2.0)]
    [1.0, 3.0]
    """
    _check(x, weight, activation)
    if cache_seqlens is not None or conv_state_indices is not None:
        raise Unsupported("cache_seqlens / conv_state_indices (a circular or indexed cache) are not supported by "
                         "wavefront's causal_conv1d_update: pass each row's state in order")
    single = x.dim() == 2
    xs = x.unsqueeze(-1) if single else x
    width, state_len, seqlen = weight.shape[1], conv_state.shape[-1], xs.shape[-1]
    if state_len < width - 1:
        raise ValueError(f"conv_state holds {state_len} inputs, the convolution needs width - 1 = {width - 1}")
    full = torch.cat([conv_state.to(weight.dtype), xs.to(weight.dtype)], dim=-1)
    conv_state.copy_(full[..., -state_len:])
    out = F.conv1d(full[..., full.shape[-1] - (width - 1 + seqlen):], weight.unsqueeze(1), bias, groups=x.shape[1])
    out = _activate(out, activation).to(x.dtype)
    return out.squeeze(-1) if single else out


__all__ = ["causal_conv1d_fn", "causal_conv1d_update"]
