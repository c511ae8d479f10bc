"""A running-max stabilised loop (RWKV-4's WKV, written with three carries num, den, max) is
proved affine in the values it stands for and runs as the stabilised log-space scan: exact in
float64 with gradients, and on transformers' RWKV."""
import pytest
import torch

import wavefront
from wavefront.testing import assert_close

F64 = torch.float64


def wkv_loop(time_decay, time_first, key, value):
    """A user's WKV, written the way RWKV-4's reference code is (its own names and spelling)."""
    out = torch.zeros_like(key)
    a = torch.zeros_like(key[:, 0])
    b = torch.zeros_like(key[:, 0])
    p = torch.full_like(key[:, 0], -1e38)
    w = -torch.exp(time_decay)
    for t in range(key.shape[1]):
        kt, vt = key[:, t], value[:, t]
        ww = time_first + kt
        q = torch.maximum(p, ww)
        e1, e2 = torch.exp(p - q), torch.exp(ww - q)
        out[:, t] = (e1 * a + e2 * vt) / (e1 * b + e2)
        ww = p + w
        q = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - q), torch.exp(kt - q)
        a = e1 * a + e2 * vt
        b = e1 * b + e2
        p = q
    return out, (a, b, p)


def clamped(key):
    """A running max that clamps: the input added depends on the max, so not a stabiliser."""
    a, b, p = torch.zeros_like(key[:, 0]), torch.zeros_like(key[:, 0]), torch.zeros_like(key[:, 0])
    out = torch.zeros_like(key)
    for t in range(key.shape[1]):
        q = torch.maximum(p, key[:, t])
        a = torch.exp(p - q) * a + key[:, t]
        b = torch.exp(p - q) * b + 1.0
        out[:, t] = a / b
        p = q
    return out


class WKV(torch.nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.time_decay, self.time_first = torch.nn.Parameter(torch.randn(ch)), torch.nn.Parameter(torch.randn(ch))

    def forward(self, k, v):
        return wkv_loop(self.time_decay, self.time_first, k, v)


@pytest.mark.parametrize("T", [2, 37, 130])
def test_a_wkv_loop_runs_as_the_log_space_scan_exactly_with_gradients(T):
    torch.manual_seed(T)
    model = WKV(6).double()
    k, v = (torch.randn(3, T, 6, dtype=F64, requires_grad=True) for _ in range(2))
    k_big = (k * 8).detach().requires_grad_()  # keys far beyond exp's float range once summed up
    (ref, ref_state) = model(k_big, v)
    leaves = [k_big, v, *model.parameters()]
    ref_grads = torch.autograd.grad(ref.sum() + ref_state[0].sum(), leaves)
    fast = wavefront.optimize(model, verify=True)
    out, state = fast(k_big, v)
    assert_close(out, ref, 1e-12, "outputs")
    for name, s, r in zip(("num", "den", "max"), state, ref_state):
        assert_close(s, r, 1e-12, name)
    grads = torch.autograd.grad(out.sum() + state[0].sum(), leaves)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, 1e-10, f"gradient {i}")
    assert "ran as a stabilised log-space scan" in str(wavefront.explain(fast))


def test_a_triple_whose_max_changes_the_result_runs_with_its_max_scanned_first():
    """A clamp written with max is not a stabiliser (the log-space proof fails), but its max is a
    running max of its own: scanned first, the other two carries are affine given it."""
    class Clamped(torch.nn.Module):
        def forward(self, k):
            return clamped(k)
    k = torch.randn(2, 9, 3, dtype=F64)
    model = Clamped()
    fast = wavefront.optimize(model)
    assert_close(fast(k), model(k), 1e-12, "outputs")
    assert "ran as a running-max scan" in str(wavefront.explain(fast))


@pytest.mark.hf
def test_transformers_rwkv_runs_its_wkv_as_the_log_space_scan():
    from wavefront import hf_families
    if "rwkv" not in hf_families.available():
        pytest.skip("this transformers has no RWKV")
    model = hf_families.build("rwkv")
    ids = hf_families.example_ids("rwkv", 2, 150)
    fast = wavefront.optimize(model, verify=True)
    with torch.no_grad():
        out, ref = fast(ids, use_cache=True), model(ids, use_cache=True)
    assert_close(out.logits, ref.logits, 1e-5, "logits")
    for i, (s, r) in enumerate(zip(out.state, ref.state)):  # the state a following call continues from
        assert_close(s, r, 1e-5, f"state {i}")
    assert "rwkv_linear_attention_cpu" in str(wavefront.explain(fast))
    assert "ran as a stabilised log-space scan" in str(wavefront.explain(fast))


def signed_weights(key, value):
    """A 'stabilised' pair whose denominator adds a value that may be negative: no log space."""
    a, b, p = torch.zeros_like(key[:, 0]), torch.zeros_like(key[:, 0]), torch.full_like(key[:, 0], -1e38)
    out = torch.zeros_like(key)
    for t in range(key.shape[1]):
        q = torch.maximum(p, key[:, t])
        e1, e2 = torch.exp(p - q), torch.exp(key[:, t] - q)
        out[:, t] = (e1 * a + e2 * value[:, t]) / (e1 * b + e2)
        a = e1 * a + e2 * value[:, t] * value[:, t]
        b = e1 * b + e2 * value[:, t]
        p = q
    return out


class Signed(torch.nn.Module):
    def forward(self, k, v):
        return signed_weights(k, v)


def test_weights_that_may_be_negative_are_not_taken_to_log_space():
    """No log space for them (a logarithm of a negative weight), but the max is a running max of
    its own and the pair is affine given it: two scans, exact whatever the signs."""
    k, v = torch.randn(2, 9, 3, dtype=F64), torch.randn(2, 9, 3, dtype=F64)
    model = Signed()
    fast = wavefront.optimize(model)
    assert_close(fast(k, v), model(k, v), 1e-12, "outputs")
    said = str(wavefront.explain(fast))
    assert "log-space" not in said and "ran as a running-max scan" in said


def shared_keys(a0, key, value, u, w):
    """Keys and values shared by the batch rows ([T, C]) while the states are per row ([B, C])."""
    a, b, p = a0.clone(), torch.ones_like(a0), torch.zeros_like(a0)
    out = torch.zeros(key.shape[0], *a0.shape, dtype=a0.dtype)
    for t in range(key.shape[0]):
        kt, vt = key[t], value[t]
        q = torch.maximum(p, u + kt)
        e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
        out[t] = (e1 * a + e2 * vt) / (e1 * b + e2)
        q2 = torch.maximum(p + w, kt)
        e1, e2 = torch.exp(p + w - q2), torch.exp(kt - q2)
        a = e1 * a + e2 * vt
        b = e1 * b + e2
        p = q2
    return out, (a, b, p)


def rounded_carry(key, value, u, w):
    """The same pair, but its numerator rounded to bfloat16 every step: not the same function."""
    a, b, p = torch.zeros_like(key[:, 0]), torch.zeros_like(key[:, 0]), torch.full_like(key[:, 0], -1e38)
    out = torch.zeros_like(key)
    for t in range(key.shape[1]):
        kt, vt = key[:, t], value[:, t]
        q = torch.maximum(p, u + kt)
        e1, e2 = torch.exp(p - q), torch.exp(u + kt - q)
        out[:, t] = (e1 * a + e2 * vt) / (e1 * b + e2)
        q2 = torch.maximum(p + w, kt)
        e1, e2 = torch.exp(p + w - q2), torch.exp(kt - q2)
        a = (e1 * a + e2 * vt).to(torch.bfloat16).to(key.dtype)
        b = e1 * b + e2
        p = q2
    return out


class SharedKeys(torch.nn.Module):
    def forward(self, *args):
        return shared_keys(*args)


class RoundedCarry(torch.nn.Module):
    def forward(self, *args):
        return rounded_carry(*args)


@pytest.mark.parametrize("B,T", [(4, 4), (3, 5)])
def test_per_step_reads_with_fewer_dims_than_the_carries_line_up_with_steps_not_rows(B, T):
    torch.manual_seed(B * T)
    C = 3
    a0, key, value = torch.randn(B, C, dtype=F64), torch.randn(T, C, dtype=F64), torch.randn(T, C, dtype=F64)
    u, w = torch.randn(C, dtype=F64), -torch.rand(C, dtype=F64)
    model = SharedKeys()
    fast = wavefront.optimize(model)
    (ref, ref_state), (out, state) = model(a0, key, value, u, w), fast(a0, key, value, u, w)
    assert_close(out, ref, 1e-12, "outputs")
    for s, r in zip(state, ref_state):
        assert_close(s, r, 1e-12, "state")
    assert "ran as a stabilised log-space scan" in str(wavefront.explain(fast))


def test_a_carry_rounded_inside_the_step_is_not_proved_away():
    torch.manual_seed(0)
    key, value = torch.randn(2, 12, 3, dtype=F64), torch.randn(2, 12, 3, dtype=F64)
    u, w = torch.randn(3, dtype=F64), -torch.rand(3, dtype=F64)
    model = RoundedCarry()
    fast = wavefront.optimize(model)
    assert torch.equal(fast(key, value, u, w), model(key, value, u, w))
    assert "left as a loop" in str(wavefront.explain(fast))


def test_a_fixed_length_export_of_a_loop_left_as_it_is_unrolls_it(tmp_path):
    pytest.importorskip("onnxruntime")
    model = Signed()
    k, v = torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    fast = wavefront.optimize(model)
    fast.export_onnx((k, v), str(tmp_path / "m.onnx"), dynamic=False)  # used to raise: "export at a fixed length"
