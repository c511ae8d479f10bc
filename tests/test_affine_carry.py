"""The affine-in-carry analysis on its own: a(x) and b(x) it extracts reproduce the step, and a
carry that enters non-affinely is refused with the reason. (Running lifted loops as scans is
tested through optimize() in test_time_loops.py and test_matrix_loops.py.)"""
import pytest
import torch
from torch import nn

from wavefront.time_loops.affine_carry import NotAffine, analyse_step
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


def _apply(step, h, x):
    """a(x) * h + b(x) with the extracted graphs (None: 1 and 0)."""
    a = step.a(x) if step.a is not None else 1.0
    b = step.b(x) if step.b is not None else 0.0
    return a * h + b


@pytest.mark.parametrize("make, h_shape, x_len", [
    (lambda: GatedStep(6).double(), (6,), 6),
    (lambda: FixedDecayStep(6).double(), (6,), 6),
    (lambda: MatrixStateStep(4, 3), (4, 3), 4 + 3 + 4),
])
def test_the_extracted_coefficients_reproduce_the_step(make, h_shape, x_len):
    torch.manual_seed(0)
    step = make()
    affine = analyse_step(step)
    for _ in range(3):
        h, x = torch.randn(*h_shape, dtype=torch.float64), torch.randn(x_len, dtype=torch.float64)
        assert_close(_apply(affine, h, x), step(h, x), 1e-12, type(step).__name__)


def test_a_non_affine_carry_is_refused_with_the_reason():
    with pytest.raises(NotAffine, match="tanh"):
        analyse_step(lambda h, x: torch.tanh(h) * 0.5 + x)
    with pytest.raises(NotAffine, match="multiplied by itself"):
        analyse_step(lambda h, x: h * h + x)
    with pytest.raises(NotAffine, match="denominator"):
        analyse_step(lambda h, x: x / h)
    with pytest.raises(NotAffine, match="does not depend on the carry"):
        analyse_step(lambda h, x: x * 2)
