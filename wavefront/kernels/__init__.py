"""Recurrent kernels under the names and signatures of mamba_ssm, causal-conv1d and
flash-linear-attention, on every device wavefront's scans run on (CPU native or chunked torch,
autograd, float32 / float64; half precision accumulates in float32).

Code written against those packages gets a CPU implementation by importing from here:

>>> import torch
>>> from wavefront.kernels import selective_scan_fn
>>> y = selective_scan_fn(torch.ones(1, 2, 3), torch.ones(1, 2, 3), -torch.ones(2, 4),
...                       torch.ones(1, 4, 3), torch.ones(1, 4, 3))
>>> y.shape
torch.Size([1, 2, 3])

optimize() substitutes them for the PyTorch fallbacks at transformers' kernel seam
(wavefront.routes.kernel_seam). KERNELS maps each API name to its function, how() says what runs it,
and RECURRENT names the ones that carry a recurrence (the convolutions are short and stateless
across calls, so a model with only those has nothing to scan).
"""
from __future__ import annotations

from wavefront.kernels.conv import causal_conv1d_fn, causal_conv1d_update
from wavefront.kernels.fla import (
    chunk_gated_delta_rule,
    chunk_kda,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_kda,
)
from wavefront.kernels.mamba import (
    mamba_chunk_scan_combined,
    selective_scan_fn,
    selective_state_update,
)

KERNELS = {
    "causal_conv1d_fn": causal_conv1d_fn,
    "causal_conv1d_update": causal_conv1d_update,
    "selective_scan_fn": selective_scan_fn,
    "selective_state_update": selective_state_update,
    "mamba_chunk_scan_combined": mamba_chunk_scan_combined,
    "chunk_gated_delta_rule": chunk_gated_delta_rule,
    "fused_recurrent_gated_delta_rule": fused_recurrent_gated_delta_rule,
    "chunk_kda": chunk_kda,
    "fused_recurrent_kda": fused_recurrent_kda,
}

HOW = {
    "causal_conv1d_fn": "a grouped conv1d",
    "causal_conv1d_update": "a grouped conv1d over the rolled state",
    "selective_scan_fn": "the native selective scan on the CPU, its torch form elsewhere",
    "selective_state_update": "one step in torch",
    "mamba_chunk_scan_combined": "the matrix scan (native on the CPU for inference, else chunked), scalar decay per head",
    "chunk_gated_delta_rule": "the delta-rule scan (native on the CPU for inference, else the chunked WY form), scalar gate",
    "fused_recurrent_gated_delta_rule": "the delta-rule scan (native on the CPU for inference, else the chunked WY form), scalar gate",
    "chunk_kda": "the delta-rule scan (native on the CPU for inference, else the chunked WY form), a gate per key channel",
    "fused_recurrent_kda": "the delta-rule scan (native on the CPU for inference, else the chunked WY form), a gate per key channel",
}



def how(api: str) -> str:
    """What runs the kernel of an API name here, now (the native build may have failed).

    >>> how("causal_conv1d_fn")
    'a grouped conv1d'
    """
    if api == "selective_scan_fn":
        import wavefront.backends.scans.selective.native as native_selective
        if native_selective.library() is None:
            return f"its torch form: the native selective scan could not be built ({native_selective.KERNEL.error})"
    return HOW[api]


RECURRENT = frozenset(set(KERNELS) - {"causal_conv1d_fn", "causal_conv1d_update"})

__all__ = ["HOW", "KERNELS", "RECURRENT", "how", *KERNELS]
