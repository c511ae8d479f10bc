"""flash-linear-attention's delta-rule functions (chunk_gated_delta_rule,
fused_recurrent_gated_delta_rule, chunk_kda, fused_recurrent_kda) on wavefront's chunked delta-rule
scan: the native CPU kernel when no gradient is needed, else the chunked WY / UT form (matmuls
inside chunks, one state carried across chunks; any device, autograd).

Per batch row and value head, with S [K, V]:
  S <- exp(g_t) S (gated DeltaNet: g [B, T, HV]; KDA: g [B, T, HV, K], one gate per key channel),
  S <- S + beta_t k_t (v_t - S^T k_t)^T,   o_t = S^T (scale q_t).
q, k: [B, T, H, K] (H divides HV: each q/k head serves HV // H value heads); v: [B, T, HV, V];
beta: [B, T, HV]; initial_state: [B, HV, K, V]. The "fused_recurrent" names are fla's decode-step
kernels: the same recurrence, run by the same scan. Outputs in q's dtype, states in the compute
dtype (float32, or float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from wavefront.backends.scans.delta.dispatch import delta_rule
from wavefront.backends.scans.shapes import compute_dtype
from wavefront.kernels.unsupported import Unsupported


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's in-kernel normalisation of q and k: x / sqrt(sum(x^2) + eps) over the last dim."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _delta(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
           per_channel: bool, name: str):
    if cu_seqlens is not None:
        raise Unsupported(f"cu_seqlens (packed sequences) is not supported by wavefront's {name}: run each sequence "
                         "as its own batch row")
    B, T, H, K = q.shape
    HV = v.shape[2]
    want_g = (B, T, HV, K) if per_channel else (B, T, HV)
    if k.shape != q.shape or v.shape[:2] != (B, T) or HV % H or tuple(g.shape) != want_g \
            or tuple(beta.shape) != (B, T, HV):
        raise ValueError(f"{name} takes q, k [B, T, H, K], v [B, T, HV, V] (H divides HV), g {list(want_g)} "
                         f"and beta [B, T, HV]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"g {tuple(g.shape)}, beta {tuple(beta.shape)}")
    out_dtype, ct = q.dtype, compute_dtype(q, k, v, g, beta, initial_state)
    q, k = (x.to(ct).repeat_interleave(HV // H, dim=2) for x in (q, k))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q = q * (K ** -0.5 if scale is None else scale)
    heads_first = lambda x: x.to(ct).transpose(1, 2)  # noqa: E731  [B, HV, T, ...]
    S0 = None if initial_state is None else initial_state.to(ct)
    o, S = delta_rule(heads_first(q), heads_first(k), heads_first(v), heads_first(beta), heads_first(g), S0)
    return o.transpose(1, 2).to(out_dtype).contiguous(), (S if output_final_state else None)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """fla's chunk_gated_delta_rule (gated DeltaNet, Qwen3-Next): returns (o [B, T, HV, V], final
    state [B, HV, K, V] or None). g is the log decay per step and value head.

    >>> q = k = torch.nn.functional.normalize(torch.randn(1, 5, 2, 4), dim=-1)
    >>> o, S = chunk_gated_delta_rule(q, k, torch.randn(1, 5, 2, 3), -torch.rand(1, 5, 2), torch.rand(1, 5, 2),
    ...                               output_final_state=True)
    >>> o.shape, S.shape
    (torch.Size([1, 5, 2, 3]), torch.Size([1, 2, 4, 3]))
    """
    return _delta(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
                  False, "chunk_gated_delta_rule")


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """fla's fused_recurrent_gated_delta_rule (the decode step): the same recurrence as
    chunk_gated_delta_rule, the same result.

    >>> q = k = torch.nn.functional.normalize(torch.randn(1, 1, 2, 4), dim=-1)
    >>> fused_recurrent_gated_delta_rule(q, k, torch.randn(1, 1, 2, 3), -torch.rand(1, 1, 2), torch.rand(1, 1, 2))[0].shape
    torch.Size([1, 1, 2, 3])
    """
    return _delta(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
                  False, "fused_recurrent_gated_delta_rule")


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              use_qk_l2norm_in_kernel=False):
    """fla's chunk_kda (Kimi Delta Attention): the gated delta rule with one log-decay gate per
    key channel, g [B, T, HV, K]. Returns (o, final state or None).

    >>> q = k = torch.nn.functional.normalize(torch.randn(1, 5, 2, 4), dim=-1)
    >>> chunk_kda(q, k, torch.randn(1, 5, 2, 3), -torch.rand(1, 5, 2, 4), torch.rand(1, 5, 2))[0].shape
    torch.Size([1, 5, 2, 3])
    """
    return _delta(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
                  True, "chunk_kda")


def fused_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                        use_qk_l2norm_in_kernel=False):
    """fla's fused_recurrent_kda (the decode step of chunk_kda): the same recurrence and result.

    >>> q = k = torch.nn.functional.normalize(torch.randn(1, 1, 2, 4), dim=-1)
    >>> fused_recurrent_kda(q, k, torch.randn(1, 1, 2, 3), -torch.rand(1, 1, 2, 4), torch.rand(1, 1, 2))[0].shape
    torch.Size([1, 1, 2, 3])
    """
    return _delta(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
                  True, "fused_recurrent_kda")


__all__ = ["chunk_gated_delta_rule", "chunk_kda", "fused_recurrent_gated_delta_rule", "fused_recurrent_kda", "l2norm"]
