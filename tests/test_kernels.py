"""wavefront.kernels: mamba_ssm's and causal-conv1d's functions, checked against plain loops in
float64 (values and gradients) and against transformers' PyTorch fallbacks in float32."""
import math

import pytest
import torch
import torch.nn.functional as F

from wavefront.kernels import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    selective_scan_fn,
    selective_state_update,
)
from wavefront.testing import assert_close

f64 = torch.float64


def selective_loop(u, dt, A, B, C, D, z):
    """Mamba-1, one step at a time; B, C [batch, groups, N, L]."""
    b, d, L = u.shape
    G = B.shape[1]
    h = torch.zeros(b, d, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(L):
        Bt = B[..., t].repeat_interleave(d // G, 1)  # [b, d, N]
        Ct = C[..., t].repeat_interleave(d // G, 1)
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * Bt * u[:, :, t, None]
        ys.append((h * Ct).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, -1) * F.silu(z), h


def ssd_loop(x, dt, A, B, C, D, S0, seq_idx=None):
    """Mamba-2's SSD, one step at a time: state [batch, heads, head_dim, N]."""
    b, L, h, p = x.shape
    G = B.shape[2]
    S = S0.clone()
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            S = S * (seq_idx[:, t] == seq_idx[:, t - 1]).to(S.dtype)[:, None, None, None]
        Bt, Ct = (v[:, t].repeat_interleave(h // G, 1) for v in (B, C))  # [b, h, N]
        S = torch.exp(dt[:, t] * A)[..., None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append((S * Ct[:, :, None]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, 1), S


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


@pytest.mark.parametrize("L,groups", [(1, 1), (37, 1), (37, 2)])
def test_selective_scan_fn_equals_the_loop_in_float64_values_and_gradients(L, groups):
    torch.manual_seed(0)
    b, d, N = 2, 6, 4
    u, dt, z = (torch.randn(b, d, L, dtype=f64, requires_grad=True) for _ in range(3))
    A = (-torch.rand(d, N, dtype=f64)).requires_grad_()
    B, C = (torch.randn(b, groups, N, L, dtype=f64, requires_grad=True) for _ in range(2))
    D, bias = (torch.randn(d, dtype=f64, requires_grad=True) for _ in range(2))
    Bk, Ck = (B[:, 0], C[:, 0]) if groups == 1 else (B, C)
    y, h = selective_scan_fn(u, dt, A, Bk, Ck, D, z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    ry, rh = selective_loop(u, F.softplus(dt + bias[:, None]), A, B, C, D, z)
    assert_close(y, ry, 1e-12, "y")
    assert_close(h, rh, 1e-12, "last state")
    inputs = (u, dt, z, A, B, C, D, bias)
    for g, rg, name in zip(_grads(y, inputs), _grads(ry, inputs), "u dt z A B C D bias".split()):
        assert_close(g, rg, 1e-10, f"grad {name}")


@pytest.mark.parametrize("L,chunk_len", [(1, 8), (45, 8), (64, 16)])
def test_mamba_chunk_scan_combined_equals_the_loop_in_float64(L, chunk_len):
    torch.manual_seed(1)
    b, h, p, G, N = 2, 4, 3, 2, 5
    x = torch.randn(b, L, h, p, dtype=f64, requires_grad=True)
    dt = torch.randn(b, L, h, dtype=f64, requires_grad=True)
    A = (-torch.rand(h, dtype=f64)).requires_grad_()
    B, C = (torch.randn(b, L, G, N, dtype=f64, requires_grad=True) for _ in range(2))
    D, bias = (torch.randn(h, dtype=f64, requires_grad=True) for _ in range(2))
    S0 = torch.randn(b, h, p, N, dtype=f64, requires_grad=True)
    y, S = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_len, D=D, dt_bias=bias, initial_states=S0,
                                     dt_softplus=True, return_final_states=True)
    ry, rS = ssd_loop(x, F.softplus(dt + bias), A, B, C, D, S0)
    assert_close(y, ry, 1e-12, "y")
    assert_close(S, rS, 1e-12, "final state")
    inputs = (x, dt, A, B, C, D, bias, S0)
    for g, rg, name in zip(_grads(y, inputs), _grads(ry, inputs), "x dt A B C D bias S0".split()):
        assert_close(g, rg, 1e-10, f"grad {name}")


def test_packed_sequences_start_fresh_states_where_seq_idx_changes():
    torch.manual_seed(2)
    b, L, h, p, N = 1, 20, 2, 3, 4
    x, dt = torch.randn(b, L, h, p, dtype=f64), torch.rand(b, L, h, dtype=f64)
    A, D = -torch.rand(h, dtype=f64), torch.randn(h, dtype=f64)
    B, C = torch.randn(b, L, 1, N, dtype=f64), torch.randn(b, L, 1, N, dtype=f64)
    seq_idx = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4])
    y = mamba_chunk_scan_combined(x, dt, A, B, C, 8, D=D, seq_idx=seq_idx)
    ry, _ = ssd_loop(x, dt, A, B, C, D, torch.zeros(b, h, p, N, dtype=f64), seq_idx)
    assert_close(y, ry, 1e-12, "y")
    cu = torch.tensor([0, 7, 16, 20])
    assert torch.equal(mamba_chunk_scan_combined(x, dt, A, B, C, 8, D=D, cu_seqlens=cu), y)
    alone = mamba_chunk_scan_combined(x[:, 7:16], dt[:, 7:16], A, B[:, 7:16], C[:, 7:16], 8, D=D)
    assert_close(y[:, 7:16], alone, 1e-12, "the second sequence alone")


def test_the_decode_step_continues_the_scan_in_both_layouts():
    torch.manual_seed(3)
    b, d, N, L = 2, 4, 3, 6
    u, dt = torch.randn(b, d, L, dtype=f64), torch.rand(b, d, L, dtype=f64)
    A, B, C, D = -torch.rand(d, N, dtype=f64), torch.randn(b, N, L, dtype=f64), torch.randn(b, N, L, dtype=f64), \
        torch.randn(d, dtype=f64)
    y, h = selective_scan_fn(u[..., :-1], dt[..., :-1], A, B[..., :-1], C[..., :-1], D, return_last_state=True)
    full = selective_scan_fn(u, dt, A, B, C, D)
    step = selective_state_update(h, u[..., -1], dt[..., -1], A, B[..., -1], C[..., -1], D)
    assert_close(step, full[..., -1], 1e-12, "Mamba-1 step")
    heads, p = 2, 2  # Mamba-2: the same channels as heads x head_dim, B and C shared by the group
    x, dt2 = torch.randn(b, L, heads, p, dtype=f64), torch.rand(b, L, heads, dtype=f64)
    A2, D2 = -torch.rand(heads, dtype=f64), torch.randn(heads, dtype=f64)
    B2, C2 = torch.randn(b, L, 1, N, dtype=f64), torch.randn(b, L, 1, N, dtype=f64)
    y2, S = mamba_chunk_scan_combined(x[:, :-1], dt2[:, :-1], A2, B2[:, :-1], C2[:, :-1], 4, D=D2,
                                      return_final_states=True)
    full2 = mamba_chunk_scan_combined(x, dt2, A2, B2, C2, 4, D=D2)
    step2 = selective_state_update(S, x[:, -1], dt2[:, -1, :, None].expand(-1, -1, p),
                                   A2[:, None, None].expand(-1, p, N), B2[:, -1], C2[:, -1],
                                   D2[:, None].expand(-1, p))
    assert_close(step2, full2[:, -1], 1e-12, "Mamba-2 step")


def test_causal_conv1d_states_carry_across_calls():
    torch.manual_seed(4)
    b, d, L, W = 2, 3, 9, 4
    x, w, bias = torch.randn(b, d, L, dtype=f64), torch.randn(d, W, dtype=f64), torch.randn(d, dtype=f64)
    full = causal_conv1d_fn(x, w, bias, activation="silu")
    ref = F.silu(F.conv1d(F.pad(x, (W - 1, 0)), w[:, None], bias, groups=d))
    assert_close(full, ref, 1e-14, "conv")
    first, state = causal_conv1d_fn(x[..., :5], w, bias, activation="silu", return_final_states=True)
    second = causal_conv1d_fn(x[..., 5:], w, bias, initial_states=state, activation="silu")
    assert_close(torch.cat([first, second], -1), full, 1e-14, "two calls")
    rolled = state.clone()
    steps = [causal_conv1d_update(x[..., t], rolled, w, bias, activation="silu") for t in range(5, L)]
    assert_close(torch.stack(steps, -1), full[..., 5:], 1e-14, "decode steps")
    with pytest.raises(ValueError, match="activation must be one of"):
        causal_conv1d_fn(x, w, activation="gelu")


def test_float32_matches_transformers_pytorch_fallbacks():
    mm = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    m2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    if not hasattr(mm, "mamba_selective_scan") or not hasattr(m2, "mamba2_chunk_scan"):
        pytest.skip("transformers 4.x has no kernel seam (its loops are lifted by the time-loop route)")
    torch.manual_seed(5)
    b, d, L, N = 2, 8, 70, 4
    u, dt, z = torch.randn(b, d, L), torch.randn(b, d, L), torch.randn(b, d, L)
    A, B, C, D, bias = -torch.rand(d, N), torch.randn(b, N, L), torch.randn(b, N, L), torch.randn(d), torch.randn(d)
    kw = dict(delta_bias=bias, delta_softplus=True, return_last_state=True)
    for got, want, name in zip(selective_scan_fn(u, dt, A, B, C, D, z, **kw),
                               mm.mamba_selective_scan.__wrapped__(u, dt, A, B, C, D, z, **kw), ("y", "state")):
        assert_close(got, want, 1e-5, f"selective scan {name}")
    h, p, G = 4, 2, 2
    x, dt2 = torch.randn(b, L, h, p), torch.randn(b, L, h)
    A2, B2, C2 = -torch.rand(h), torch.randn(b, L, G, N), torch.randn(b, L, G, N)
    kw2 = dict(D=torch.randn(h), dt_bias=torch.randn(h), initial_states=torch.randn(b, h, p, N), dt_softplus=True,
               dt_limit=(0.0, math.inf), return_final_states=True)
    for got, want, name in zip(mamba_chunk_scan_combined(x, dt2, A2, B2, C2, 16, **kw2),
                               m2.mamba2_chunk_scan.__wrapped__(x, dt2, A2, B2, C2, 16, **kw2), ("y", "state")):
        assert_close(got, want, 1e-5, f"SSD {name}")


def test_half_precision_accumulates_in_float32_and_returns_the_input_dtype():
    torch.manual_seed(6)
    x, dt = torch.randn(1, 33, 2, 4), torch.rand(1, 33, 2)
    A, B, C = -torch.rand(2), torch.randn(1, 33, 1, 8), torch.randn(1, 33, 1, 8)
    y = mamba_chunk_scan_combined(x.bfloat16(), dt.bfloat16(), A, B.bfloat16(), C.bfloat16(), 16)
    assert y.dtype == torch.bfloat16
    ref = mamba_chunk_scan_combined(x.bfloat16().float(), dt.bfloat16().float(), A, B.bfloat16().float(),
                                    C.bfloat16().float(), 16)
    assert_close(y.float(), ref, 1e-2, "bfloat16 vs float32 on the same inputs")  # bfloat16 rounding of y itself


def _delta_inputs(per_channel, dtype=torch.float32, B=2, T=45, H=2, HV=4, K=8, V=4, seed=7):
    torch.manual_seed(seed)
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    v = torch.randn(B, T, HV, V, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, HV, *((K,) if per_channel else ()), dtype=dtype))
    beta, S0 = torch.rand(B, T, HV, dtype=dtype), torch.randn(B, HV, K, V, dtype=dtype)
    return q, k, v, g, beta, S0


@pytest.mark.parametrize("per_channel", [False, True])
def test_fla_delta_rules_equal_the_step_loop_in_float64(per_channel):
    from wavefront.backends.scans.delta.naive import delta_rule_reference

    from wavefront.kernels import (
        chunk_gated_delta_rule,
        chunk_kda,
        fused_recurrent_gated_delta_rule,
        fused_recurrent_kda,
    )
    from wavefront.kernels.fla import l2norm
    q, k, v, g, beta, S0 = (t.requires_grad_() for t in _delta_inputs(per_channel, f64))
    chunked, step = (chunk_kda, fused_recurrent_kda) if per_channel else \
        (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule)
    o, S = chunked(q, k, v, g, beta, initial_state=S0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    heads = lambda t: t.repeat_interleave(2, dim=2).transpose(1, 2)  # noqa: E731  each q/k head serves 2 value heads
    ro, rS = delta_rule_reference(l2norm(heads(q)) * 8 ** -0.5, l2norm(heads(k)), v.transpose(1, 2),
                                  beta.transpose(1, 2), g.transpose(1, 2), S0)
    assert_close(o, ro.transpose(1, 2), 1e-12, "o")
    assert_close(S, rS, 1e-12, "final state")
    inputs = (q, k, v, g, beta, S0)
    for gr, rg, name in zip(_grads(o, inputs), _grads(ro.transpose(1, 2), inputs), "q k v g beta S0".split()):
        assert_close(gr, rg, 1e-10, f"grad {name}")
    o1, S1 = step(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], initial_state=S0, output_final_state=True,
                  use_qk_l2norm_in_kernel=True)
    assert_close(o1, ro.transpose(1, 2)[:, :1], 1e-12, "decode step")
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunked(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 45]))


def test_fla_delta_rules_match_transformers_pytorch_fallbacks_in_float32():
    qn = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    kl = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    from wavefront.kernels import (
        chunk_gated_delta_rule,
        chunk_kda,
        fused_recurrent_gated_delta_rule,
        fused_recurrent_kda,
    )
    pairs = [(False, chunk_gated_delta_rule, qn.torch_chunk_gated_delta_rule),
             (False, fused_recurrent_gated_delta_rule, qn.torch_recurrent_gated_delta_rule),
             (True, chunk_kda, kl.chunk_kimi_delta_attention), (True, fused_recurrent_kda, kl.recurrent_kimi_delta_attention)]
    for per_channel, ours, theirs in pairs:
        q, k, v, g, beta, S0 = _delta_inputs(per_channel, H=4)  # the KDA fallbacks take as many q/k as value heads
        kw = dict(g=g, beta=beta, initial_state=S0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        for got, want, name in zip(ours(q, k, v, **kw), theirs.__wrapped__(q, k, v, **kw), ("o", "state")):
            assert_close(got, want, 2e-6, f"{ours.__name__} {name}")


def test_the_chunk_scan_clamps_dt_to_its_limit_like_mamba_ssm():
    """dt_limit defaults to (0, inf): a negative dt (no softplus) counts as 0, as in mamba_ssm."""
    torch.manual_seed(8)
    x, dt = torch.randn(1, 9, 2, 3, dtype=f64), torch.randn(1, 9, 2, dtype=f64)
    A, B, C = -torch.rand(2, dtype=f64), torch.randn(1, 9, 1, 4, dtype=f64), torch.randn(1, 9, 1, 4, dtype=f64)
    y = mamba_chunk_scan_combined(x, dt, A, B, C, 4)
    ry, _ = ssd_loop(x, dt.clamp(min=0), A, B, C, torch.zeros(2, dtype=f64), torch.zeros(1, 2, 3, 4, dtype=f64))
    assert_close(y, ry, 1e-12, "y")


def test_inputs_a_kernel_does_not_run_raise_unsupported_before_touching_the_state():
    from wavefront.kernels.unsupported import Unsupported
    x, w, state = torch.randn(1, 2, 3), torch.randn(2, 4), torch.randn(1, 2, 3)
    before = state.clone()
    with pytest.raises(Unsupported, match="activation"):
        causal_conv1d_update(x, state, w, activation="gelu")
    assert torch.equal(state, before)


def test_the_native_matrix_scan_refuses_shapes_off_the_contract():
    from wavefront.backends.scans.matrix.dispatch import matrix_scan
    q, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 2)
    with pytest.raises(ValueError, match="alike"):
        matrix_scan(q, torch.randn(1, 3, 5, 4), v)  # read out of bounds by the kernel, were it called
    with pytest.raises(ValueError, match="S0 must broadcast"):
        matrix_scan(q, q, v, None, torch.randn(2, 3, 4, 3))
