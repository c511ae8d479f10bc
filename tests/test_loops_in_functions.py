"""Loops in the module-level functions a model's methods call (as transformers writes RWKV's WKV
loop or MiniMax's block loop), followed from the methods, lifted like method loops, put in place
only for the duration of a call."""
import pytest
import torch
from torch import nn

import wavefront
from wavefront.testing import assert_close
from wavefront.time_loops.model import FunctionSlot, LoopLiftedModel

F64 = torch.float64


def gated_scan(x, a):
    h = torch.zeros_like(x[:, 0])
    out = torch.zeros_like(x)
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t]
        out[:, t] = h
    return out


def gate_then_scan(x, gate):  # one level between the method and the loop
    return gated_scan(x, torch.sigmoid(gate(x)))


class CallsAFunction(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate = nn.Linear(d, d)

    def forward(self, x):
        return gate_then_scan(x, self.gate)


def test_a_loop_in_a_called_function_runs_as_a_scan_exactly_with_gradients():
    model = CallsAFunction(4).double()
    fast = wavefront.optimize(model, verify=True)
    assert isinstance(fast, LoopLiftedModel)
    assert any(isinstance(target, FunctionSlot) and target.name == "gated_scan" for target, _ in fast.loops)
    x = torch.randn(3, 17, 4, dtype=F64, requires_grad=True)
    out, ref = fast(x), model(x)
    assert_close(out, ref, 1e-12, "called function's loop")
    g1, = torch.autograd.grad(out.square().sum(), x)
    g2, = torch.autograd.grad(ref.square().sum(), x)
    assert_close(g1, g2, 1e-12, "gradients")
    assert "gated_scan line" in str(wavefront.explain(fast)) and "ran as a scan" in str(wavefront.explain(fast))
    assert globals()["gated_scan"] is gated_scan  # put back after the call


def test_the_function_is_put_back_after_an_error():
    fast = wavefront.optimize(CallsAFunction(4))
    with pytest.raises(RuntimeError):
        fast(torch.randn(2, 5, 3))  # the gate's Linear refuses the width
    assert globals()["gated_scan"] is gated_scan


def test_a_function_the_user_replaced_meanwhile_is_left_alone(monkeypatch):
    fast = wavefront.optimize(CallsAFunction(4).double())

    def other(x, a):
        return x * 0 + 7
    monkeypatch.setitem(globals(), "gated_scan", other)  # the user's own swap wins: never overwritten
    x = torch.randn(1, 4, 4, dtype=F64)
    assert torch.equal(fast(x), torch.full_like(x, 7.0))
    assert globals()["gated_scan"] is other
