"""A user's delta-rule loop (DeltaNet: S = a S; S = S + beta k (v - S^T k)^T; o = S^T q) runs as
the chunked delta-rule scan: exact in float64, values and gradients, any length."""
import pytest
import torch

import wavefront
from wavefront.models import DeltaNet
from wavefront.testing import assert_close

F64 = torch.float64


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T", [1, 2, 45, 130])
def test_deltanet_loop_runs_as_the_delta_scan_exactly_with_gradients(gated, T):
    torch.manual_seed(T)
    model = DeltaNet(12, 2, 6, gated=gated).double()
    x = torch.randn(2, T, 12, dtype=F64, requires_grad=True)
    leaves = [x, *(p for n, p in model.named_parameters() if gated or not n.startswith("g."))]  # g: the gate
    ref = model(x)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), leaves)
    fast = wavefront.optimize(model, verify=True)
    out = fast(x)
    assert_close(out, ref, 1e-12, "outputs")
    for i, (g, r) in enumerate(zip(torch.autograd.grad(out.pow(2).sum(), leaves), ref_grads)):
        assert_close(g, r, 1e-10, f"gradient {i}")
    status = str(wavefront.explain(fast))
    assert ("ran as a delta-rule scan" in status) if T > 1 else ("loop over `t`" in status)


def test_explain_before_any_call_says_what_the_loop_is():
    text = str(wavefront.explain(DeltaNet(8, 2, 4, gated=True)))
    assert "delta-rule" in text and "not affine" not in text


def test_a_per_key_dim_gate_runs_as_the_kda_form():
    class KDA(torch.nn.Module):
        def forward(self, q, k, v, beta, a):
            S = q.new_zeros(q.shape[0], q.shape[2], v.shape[2])
            out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
            for t in range(q.shape[1]):
                S = a[:, t, :, None] * S
                kt = k[:, t]
                S = S + beta[:, t, None, None] * kt[..., None] * (v[:, t] - (S * kt[..., None]).sum(-2))[..., None, :]
                out[:, t] = (S * q[:, t][..., None]).sum(-2)
            return out
    torch.manual_seed(0)
    B, T, dk, dv = 3, 40, 5, 4
    q, v = torch.randn(B, T, dk, dtype=F64), torch.randn(B, T, dv, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(B, T, dk, dtype=F64), dim=-1)
    beta, a = torch.rand(B, T, dtype=F64), torch.rand(B, T, dk, dtype=F64) * 0.5 + 0.5
    model = KDA()
    fast = wavefront.optimize(model)
    assert_close(fast(q, k, v, beta, a), model(q, k, v, beta, a), 1e-12, "outputs")
    assert "ran as a delta-rule scan" in str(wavefront.explain(fast))


def test_a_readout_of_the_undecayed_state_is_not_taken_for_the_delta_rule():
    """v - S_old^T k with the decay applied after: a different recurrence, left as a loop."""
    class Wrong(torch.nn.Module):
        def forward(self, k, v, a):
            S = k.new_zeros(k.shape[0], k.shape[2], v.shape[2])
            out = k.new_empty(k.shape[0], k.shape[1], v.shape[2])
            for t in range(k.shape[1]):
                err = v[:, t] - torch.einsum("bkv,bk->bv", S, k[:, t])
                S = a[:, t, None, None] * S + k[:, t].unsqueeze(-1) * err.unsqueeze(-2)
                out[:, t] = torch.einsum("bkv,bk->bv", S, k[:, t])
            return out
    torch.manual_seed(1)
    k, v, a = torch.randn(2, 9, 3, dtype=F64), torch.randn(2, 9, 2, dtype=F64), torch.rand(2, 9, dtype=F64)
    model = Wrong()
    with pytest.warns(UserWarning):
        fast = wavefront.optimize(model)
    assert torch.equal(fast(k, v, a), model(k, v, a))
    assert "left as a loop" in str(wavefront.explain(fast))


class BetaPlacement(torch.nn.Module):
    """beta on the key, on the error, or on both and the update: the same delta rule."""

    def __init__(self, where):
        super().__init__()
        self.where = where

    def forward(self, k, v, q, beta):
        S = k.new_zeros(k.shape[0], k.shape[1], k.shape[3], v.shape[3])
        out = k.new_empty(k.shape[0], k.shape[1], k.shape[2], v.shape[3])
        for t in range(k.shape[2]):
            kt, bt = k[:, :, t], beta[:, :, t]
            err = v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, kt)
            if_key = (kt * bt[..., None]).unsqueeze(-1) * err.unsqueeze(-2)
            S = S + (if_key if self.where == "key" else kt.unsqueeze(-1) * (err * bt[..., None]).unsqueeze(-2)
                     if self.where == "value" else bt[..., None, None] * if_key)
            out[:, :, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, :, t])
        return out


@pytest.mark.parametrize("where", ["key", "value", "both"])
@pytest.mark.parametrize("heads", [1, 3])
def test_beta_anywhere_in_the_update_is_the_same_delta_rule(where, heads):
    torch.manual_seed(heads)
    B, T, dk, dv = 2, 11, 4, 3
    k = torch.nn.functional.normalize(torch.randn(B, heads, T, dk, dtype=F64), dim=-1)
    v, q, beta = torch.randn(B, heads, T, dv, dtype=F64), torch.randn(B, heads, T, dk, dtype=F64), \
        torch.rand(B, heads, T, dtype=F64)
    model = BetaPlacement(where)
    fast = wavefront.optimize(model)
    assert_close(fast(k, v, q, beta), model(k, v, q, beta), 1e-12, "outputs")
    assert "ran as a delta-rule scan" in str(wavefront.explain(fast))


class NotQuiteDelta(torch.nn.Module):
    """torch.sub(v, S^T k, alpha=2) and a float16 readout: not the delta rule, left as loops."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant

    def forward(self, k, v):
        S = k.new_zeros(k.shape[0], k.shape[2], v.shape[2])
        out = k.new_empty(k.shape[0], k.shape[1], v.shape[2])
        for t in range(k.shape[1]):
            kt = k[:, t]
            if self.variant == "alpha":
                err = torch.sub(v[:, t], torch.einsum("bkv,bk->bv", S, kt), alpha=2.0)
            else:
                err = v[:, t] - (S * kt.unsqueeze(-1)).sum(-2, dtype=torch.float16)
            S = S + kt.unsqueeze(-1) * err.unsqueeze(-2)
            out[:, t] = torch.einsum("bkv,bk->bv", S, kt)
        return out


@pytest.mark.parametrize("variant", ["alpha", "dtype"])
def test_a_subtraction_with_alpha_or_a_rounding_readout_is_not_taken_for_the_delta_rule(variant):
    k, v = torch.randn(2, 7, 3, dtype=F64), torch.randn(2, 7, 2, dtype=F64)
    model = NotQuiteDelta(variant)
    with pytest.warns(UserWarning):
        fast = wavefront.optimize(model)
    assert torch.equal(fast(k, v), model(k, v))
