"""Python time loops in users' modules: found in the source, proved affine, run as scans, exactly."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import wavefront
from wavefront.time_loops.model import LoopLiftedModel
from wavefront.models import ElmanRNN, MinGRU
from wavefront.time_loops.source import find_time_loops
from wavefront.testing import assert_close

F64 = torch.float64


class LeftBehind(nn.Module):
    """What the loop leaves in its names afterwards: the carry, a temporary and the index."""

    def forward(self, x):
        h = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            g = torch.sigmoid(x[:, t])
            h = g * h + x[:, t]
        return h, g, t


class ReverseWrites(nn.Module):
    """Reverse direction, outputs written in place at `out[:, t]`, an output non-linear in the carry."""

    def forward(self, a, b):
        h = torch.zeros(a.shape[0], a.shape[2], dtype=a.dtype)
        out = torch.zeros_like(a)
        for t in reversed(range(a.shape[1])):
            h = a[:, t] * h + b[:, t]
            out[:, t] = h.tanh()
        return out, h


class ComplexLRU(nn.Module):
    """LRU-style: a fixed complex diagonal, a carry that widens from a 0-dim start, time on dim 0."""

    def __init__(self, d):
        super().__init__()
        self.nu = nn.Parameter(torch.rand(d, dtype=F64))
        self.theta = nn.Parameter(torch.rand(d, dtype=F64))

    def forward(self, u):  # u: [T, d] complex
        lam = torch.exp(torch.complex(-self.nu, self.theta))
        h = torch.zeros((), dtype=torch.complex128)
        ys = torch.zeros(u.shape, dtype=torch.complex128)
        for k in range(u.shape[0]):
            h = lam * h + u[k]
            ys[k] = h
        return ys.real


class ScalarStart(nn.Module):
    """A carry that starts as a Python number: declined at run time, the loop runs as written."""

    def forward(self, x):
        h = 0.0
        for t in range(x.shape[1]):
            h = 0.5 * h + x[:, t]
        return h


def _pair(model, *args):
    ref = model(*args)
    fast = wavefront.optimize(model, verify=True)
    assert isinstance(fast, LoopLiftedModel)
    return fast, ref, fast(*args)


def test_sites_classify_carries_temporaries_inputs_and_outputs():
    (site,) = find_time_loops(MinGRU.forward)
    assert site.liftable and site.index == "t"
    assert site.carries == ["h"] and site.temps == ["z"] and site.free == ["self", "x"]
    assert [(o.kind, o.container) for o in site.outputs] == [("append", "outs")]
    (site,) = find_time_loops(ReverseWrites.forward)
    assert [(o.kind, o.container, o.position) for o in site.outputs] == [("write", "out", 1)]


@pytest.mark.parametrize("body, reason", [
    ("        if t > 0:\n            h = h + x[t]\n", "`If` statement"),
    ("        h = h + out[t - 1]\n        out[t] = h\n", "reads its own output `out`"),
    ("        out[t, 0] = h\n        h = h + x[t]\n", "the write `out[t, 0]`"),
    ("        y = x[t] * 2\n", "no value is carried"),
    ("        print(h)\n        h = h + x[t]\n", "a call statement"),
])
def test_unsupported_loop_bodies_are_reported_with_the_reason(body, reason):
    src = "def f(x, h, g, out):\n    for t in range(x.shape[0]):\n" + body + "    return h\n"
    ns = {}
    exec(compile(src, "<test>", "exec"), ns)
    import linecache
    linecache.cache["<test>"] = (len(src), None, src.splitlines(True), "<test>")
    (site,) = find_time_loops(ns["f"])
    assert not site.liftable and reason in site.reason


def test_mingru_outputs_and_gradients_match_the_loop_in_float64():
    torch.manual_seed(0)
    model = MinGRU(5).to(F64)
    x = torch.randn(3, 40, 5, dtype=F64, requires_grad=True)
    fast, ref, out = _pair(model, x)
    assert_close(out, ref, 1e-12, "outputs")
    gx_ref, *gp_ref = torch.autograd.grad(ref.pow(2).sum(), [x, *model.parameters()])
    gx, *gp = torch.autograd.grad(out.pow(2).sum(), [x, *model.parameters()])
    assert_close(gx, gx_ref, 1e-10, "input grad")
    for a, b in zip(gp, gp_ref):
        assert_close(a, b, 1e-10, "parameter grad")
    assert "ran as a scan" in str(wavefront.explain(fast))


def test_names_left_after_the_loop_hold_the_last_iterations_values():
    x = torch.randn(2, 25, 3, dtype=F64)
    _, ref, out = _pair(LeftBehind(), x)
    assert_close(out[0], ref[0], 1e-12, "carry")
    assert torch.equal(out[1], ref[1]) and out[2] == ref[2] == 24


def test_reverse_in_place_writes_match_the_loop():
    torch.manual_seed(1)
    a, b = torch.rand(2, 33, 4, dtype=F64), torch.randn(2, 33, 4, dtype=F64)
    _, ref, out = _pair(ReverseWrites(), a, b)
    for x, y in zip(out, ref):
        assert_close(x, y, 1e-12, "reverse scan")


def test_complex_carry_widening_from_a_scalar():
    torch.manual_seed(2)
    u = torch.randn(50, 6, dtype=torch.complex128)
    _, ref, out = _pair(ComplexLRU(6), u)
    assert_close(out, ref, 1e-12, "complex LRU")


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 70), B=st.integers(1, 3), d=st.integers(1, 6))
def test_random_lengths_and_widths(T, B, d):
    torch.manual_seed(T * 31 + d)
    a, b = torch.rand(B, T, d, dtype=F64), torch.randn(B, T, d, dtype=F64)
    ref = ReverseWrites()(a, b)
    out = LoopLiftedModel(ReverseWrites(), wavefront.time_loops.model.model_time_loops(ReverseWrites()))(a, b)
    for x, y in zip(out, ref):
        assert_close(x, y, 1e-12, f"T={T}")


def test_float32_is_within_1e5_of_the_float64_loop_at_4k_steps():
    torch.manual_seed(3)
    a = torch.rand(2, 4096, 8, dtype=F64) * 0.2 + 0.8
    b = torch.randn(2, 4096, 8, dtype=F64)
    ref, _ = ReverseWrites()(a, b)
    out, _ = wavefront.optimize(ReverseWrites())(a.float(), b.float())
    assert_close(out, ref, 1e-5, "fp32 vs fp64 loop")


def test_a_non_affine_carry_is_reported_and_left_as_it_is():
    torch.manual_seed(4)
    model = ElmanRNN(4)
    text = str(wavefront.explain(model))
    assert "not affine" in text and "`self.w(h)`" in text and "h = torch.tanh(self.w(h) + x[:, t])" in text
    with pytest.warns(UserWarning, match="no time loop can run as a scan"):
        fast = wavefront.optimize(model)
    x = torch.randn(2, 9, 4)
    assert torch.equal(fast(x), model(x))


def test_a_declined_call_runs_the_original_loop():
    x = torch.randn(2, 7, 3, dtype=F64)
    model = ScalarStart()
    fast = wavefront.optimize(model)
    assert torch.equal(fast(x), model(x))
    assert "does not start as a float tensor" in str(wavefront.explain(fast))


def test_the_plan_does_not_grow_with_the_length():
    """Capture cost must not grow with T: one traced body per call, whatever T is."""
    model = MinGRU(3).to(F64)
    fast = wavefront.optimize(model)
    runner = fast.loops[0][1].runner
    for T in (5, 3000):
        fast(torch.randn(1, T, 3, dtype=F64))
    (plan,) = [p for k, p in runner._plans.items()  # one plan served both lengths
               if any(v[:2] == ("module", id(model)) for v in k[3])]
    assert len(list(plan.affine.traced.graph.nodes)) < 30


def test_methods_are_restored_after_each_call_even_on_error():
    model = MinGRU(3)
    fast = wavefront.optimize(model)
    with pytest.raises(RuntimeError):
        fast(torch.randn(1, 4, 5))  # wrong width: fails inside the lifted forward
    assert "forward" not in vars(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast(torch.randn(1, 4, 3))
    assert "forward" not in vars(model)


def test_a_scan_too_large_for_memory_is_declined_and_the_loop_runs(monkeypatch):
    monkeypatch.setenv("WAVEFRONT_SCAN_MEMORY_GB", "0.000001")
    x = torch.randn(2, 300, 8, dtype=F64)
    model = MinGRU(8).to(F64)
    fast = wavefront.optimize(model)
    assert torch.equal(fast(x), model(x))
    assert "GiB of per-step coefficients" in str(wavefront.explain(fast))


class Switchable(nn.Module):
    """One method, two instances: affine in h when self.squared is False, not affine otherwise."""

    def __init__(self, squared: bool):
        super().__init__()
        self.squared = squared

    def forward(self, x):
        h = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            h = (h * h if self.squared else 0.5 * h) + x[:, t]
        return h


class TwoSwitchables(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain, self.squared = Switchable(False), Switchable(True)

    def forward(self, x):
        return self.plain(x) + self.squared(x)


def test_each_instance_reports_how_its_own_loop_ran():
    model = TwoSwitchables()
    fast = wavefront.optimize(model)
    x = torch.randn(2, 5, 3, dtype=F64) * 0.1
    assert_close(fast(x), model(x), 1e-12, "two instances of one lifted method")
    lines = fast.report()
    assert len(lines) == 2, lines
    plain = next(line for line in lines if line.endswith("[in plain]"))
    squared = next(line for line in lines if line.endswith("[in squared]"))
    assert "ran as a" in plain and "left as a loop" in squared and "multiplied by itself" in squared


class ConstantCoefficients(nn.Module):
    """Coefficients that are Python numbers: an EMA (a = 0.9) and a counter (a = 1, b = 1.0)."""

    def forward(self, x):
        h = torch.zeros_like(x[:, 0])
        n = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            h = 0.9 * h + 0.1 * x[:, t]
        for t in range(x.shape[1]):
            n = n + 1.0
        return h, n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_python_number_coefficients_keep_the_carry_dtype(dtype):
    model = ConstantCoefficients()
    fast = wavefront.optimize(model)
    x = torch.randn(2, 33, 3, dtype=dtype)
    (h, n), (h_ref, n_ref) = fast(x), model(x)
    assert h.dtype == n.dtype == dtype
    assert_close(h, h_ref, 1e-12 if dtype == torch.float64 else 1e-5, "EMA")
    assert torch.equal(n, n_ref)
    assert all("ran as a" in line for line in fast.report()), fast.report()


class WritesInItsDtype(nn.Module):
    """Reads its output's dtype while writing it (as transformers' RWKV loop does): metadata, not
    a value an earlier iteration wrote."""

    def forward(self, a, b):
        h = torch.zeros_like(a[:, 0])
        out = torch.zeros(a.shape, dtype=torch.float32)
        for t in range(a.shape[1]):
            h = a[:, t] * h + b[:, t]
            out[:, t] = h.to(out.dtype) * out.shape[0]
        return out


def test_reading_the_outputs_dtype_or_shape_is_not_reading_the_output():
    model = WritesInItsDtype()
    a, b = torch.rand(2, 9, 3, dtype=F64), torch.randn(2, 9, 3, dtype=F64)
    fast = wavefront.optimize(model)
    assert_close(fast(a, b), model(a, b), 1e-6, "written in the output's dtype")
    assert "ran as a scan" in str(wavefront.explain(fast))
