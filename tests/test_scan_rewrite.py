"""Affine-in-carry analysis and the scan rewrite of recurrence steps, against the plain loop."""
import pytest
import torch
from torch import nn

from wavefront.passes.affine_carry import NotAffine, analyse_step
from wavefront.passes.scan_rewrite import loop_reference, plan_step, scan_loop
from wavefront.testing import assert_close


class GatedStep(nn.Module):
    """Input-dependent decay (minGRU / RG-LRU style): h = sigmoid(W x) h + (1 - sigmoid(W x)) U x."""

    def __init__(self, d):
        super().__init__()
        self.gate, self.inp = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h, x):
        g = torch.sigmoid(self.gate(x))
        return g * h + (1 - g) * self.inp(x)


class FixedDecayStep(nn.Module):
    """S4D/LRU style: a fixed learned decay in (0, 1)."""

    def __init__(self, d):
        super().__init__()
        self.log_a = nn.Parameter(torch.randn(d))

    def forward(self, h, x):
        return torch.exp(-torch.exp(self.log_a)) * h + x


class MatrixStateStep(nn.Module):
    """GLA / RetNet style matrix state: S = diag(a) S + k v^T, x packs (k, v, decay logits)."""

    def __init__(self, dk, dv):
        super().__init__()
        self.dk, self.dv = dk, dv

    def forward(self, S, x):
        k, v, z = x[: self.dk], x[self.dk: self.dk + self.dv], x[self.dk + self.dv:]
        return torch.sigmoid(z).unsqueeze(-1) * S + k.unsqueeze(-1) * v.unsqueeze(0)


class LSTMishStep(nn.Module):
    def forward(self, h, x):
        return torch.tanh(h) * 0.5 + x


def run_both(step, init, xs):
    return scan_loop(step, init, xs), loop_reference(step, init, xs)


@pytest.mark.parametrize("T", [1, 7, 1000])
def test_gated_and_fixed_decay_steps(T):
    torch.manual_seed(0)
    for step in (GatedStep(6).double(), FixedDecayStep(6).double()):
        xs, h0 = torch.randn(T, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
        plan = plan_step(step)
        assert plan.parallel, plan.reason
        got, ref = run_both(step, h0, xs)
        assert_close(got, ref, 1e-12, f"{type(step).__name__} T={T}")


def test_matrix_state_step():
    torch.manual_seed(0)
    step = MatrixStateStep(4, 3)
    xs, S0 = torch.randn(50, 4 + 3 + 4, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    got, ref = run_both(step, S0, xs)
    assert got.shape == (50, 4, 3)
    assert_close(got, ref, 1e-12, "matrix state")


def test_gradients_match_the_loop():
    torch.manual_seed(0)
    step = GatedStep(5).double()
    xs = torch.randn(40, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(5, dtype=torch.float64)
    w = torch.randn(40, 5, dtype=torch.float64)
    (scan_loop(step, h0, xs) * w).sum().backward()
    got = [xs.grad.clone()] + [p.grad.clone() for p in step.parameters()]
    xs.grad = None
    step.zero_grad()
    (loop_reference(step, h0, xs) * w).sum().backward()
    for g, r in zip(got, [xs.grad] + [p.grad for p in step.parameters()]):
        assert_close(g, r, 1e-10, "grad")


def test_non_affine_carry_is_reported_and_left_as_a_loop():
    step = LSTMishStep()
    plan = plan_step(step)
    assert not plan.parallel and "tanh" in plan.reason and "not scan-parallelizable" in plan.reason
    xs, h0 = torch.randn(20, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    assert torch.equal(scan_loop(step, h0, xs, plan), loop_reference(step, h0, xs))
    with pytest.raises(NotAffine, match="multiplied by itself"):
        analyse_step(lambda h, x: h * h + x)
    with pytest.raises(NotAffine, match="denominator"):
        analyse_step(lambda h, x: x / h)
    with pytest.raises(NotAffine, match="does not depend on the carry"):
        analyse_step(lambda h, x: x * 2)


def test_analysis_cost_does_not_depend_on_T():
    """The step is traced once; nothing is unrolled over time."""
    step = GatedStep(4)
    plan = plan_step(step)
    n_nodes = len(plan.affine.traced.graph.nodes)
    xs = torch.randn(16384, 4)
    out = scan_loop(step, torch.zeros(4), xs, plan)
    assert out.shape == (16384, 4) and len(plan.affine.traced.graph.nodes) == n_nodes


class ScanModel(nn.Module):
    """Uses torch's scan op: a gated recurrence, and optionally a non-affine one beside it."""

    def __init__(self, d, with_tanh=False):
        super().__init__()
        self.gate = nn.Linear(d, d)
        self.with_tanh = with_tanh

    def forward(self, x):
        from torch._higher_order_ops.scan import scan
        a = torch.sigmoid(self.gate(x))

        def affine(h, ax):
            a_t, x_t = ax
            h = a_t * h + (1 - a_t) * x_t
            return h, h * 2.0 + x_t  # a y that is not just the carry

        _, ys = scan(affine, torch.zeros(x.shape[1], dtype=x.dtype), (a, x))
        if not self.with_tanh:
            return ys

        def lstmish(h, xs_t):
            h = torch.tanh(h) + xs_t[0]
            return h, h.clone()

        _, zs = scan(lstmish, torch.zeros(x.shape[1], dtype=x.dtype), (ys,))
        return zs


@pytest.mark.parametrize("with_tanh", [False, True])
def test_exported_scans_are_parallelized_at_any_length(with_tanh):
    from wavefront.passes.scan_rewrite import AffineScan, parallelize_exported
    torch.manual_seed(0)
    model = ScanModel(4, with_tanh).double()
    T = torch.export.Dim("T", min=2)
    gm, report = parallelize_exported(model, (torch.randn(8, 4, dtype=torch.float64),), {"x": {0: T}})
    assert any("parallel scan" in line for line in report)
    assert any(isinstance(m, AffineScan) for m in gm.modules())
    if with_tanh:
        assert any("left as a loop" in line and "tanh" in line for line in report)
    for n in (3, 7, 1000):  # lengths other than the exported example
        x = torch.randn(n, 4, dtype=torch.float64)
        assert_close(gm(x), model(x), 1e-12, f"T={n}")
