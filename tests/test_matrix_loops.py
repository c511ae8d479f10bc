"""Matrix-state loops (S = a S + k v^T, y = S^T q) in users' modules run as the chunked matrix
scan, exactly, without holding T states; other spellings stay on the (exact) generic scan."""
import inspect

import pytest
import torch
from torch import nn

import wavefront
from wavefront.models import GatedLinearAttention
from wavefront.testing import assert_close, rel_err

F64 = torch.float64
ROUTED = "ran as a chunked matrix-state scan"


def _status(fast):
    return str(wavefront.explain(fast))


@pytest.mark.parametrize("decay", ["none", "scalar", "per_dim"])
@pytest.mark.parametrize("T", [1, 37])
def test_outputs_and_gradients_match_the_loop_in_float64(decay, T):
    torch.manual_seed(T)
    model = GatedLinearAttention(12, 2, 5, decay).to(F64)
    x = torch.randn(2, T, 12, dtype=F64, requires_grad=True)
    ref = model(x)
    fast = wavefront.optimize(model)
    out = fast(x)
    assert_close(out, ref, 1e-12, f"outputs, decay {decay}")
    assert ROUTED in _status(fast)
    used = [x, *(p for name, p in model.named_parameters() if decay != "none" or not name.startswith("g."))]
    g_ref = torch.autograd.grad(ref.pow(2).sum(), used)
    g = torch.autograd.grad(out.pow(2).sum(), used)
    for a, b in zip(g, g_ref):
        assert_close(a, b, 1e-10, "gradient")


def test_float32_is_within_1e5_of_the_float64_loop_at_1k_steps():
    torch.manual_seed(0)
    model = GatedLinearAttention(16, 2, 8, "per_dim")
    x = torch.randn(1, 1024, 16)
    with torch.no_grad():
        ref = model.to(F64)(x.to(F64))
        out = wavefront.optimize(model.float())(x)
    assert rel_err(out, ref) <= 1e-5


def test_the_routed_loop_holds_no_per_step_states(monkeypatch):
    # a budget the generic scan's T states would exceed: only the chunked form may run
    monkeypatch.setenv("WAVEFRONT_SCAN_MEMORY_GB", "0.0001")
    torch.manual_seed(0)
    model = GatedLinearAttention(16, 2, 16, "scalar").to(F64)
    x = torch.randn(2, 400, 16, dtype=F64)
    with torch.no_grad():
        fast = wavefront.optimize(model)
        assert_close(fast(x), model(x), 1e-12, "outputs")
    assert ROUTED in _status(fast)


class Spellings(nn.Module):
    """Other ways users write the same update and readout; `form` picks one."""

    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, a):
        S = q.new_zeros(q.shape[0], q.shape[2], v.shape[2])
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        if self.form == "matmul":
            for t in range(q.shape[1]):
                S = a[:, t, None, None] * S + k[:, t].unsqueeze(-1) @ v[:, t].unsqueeze(-2)
                out[:, t] = (q[:, t].unsqueeze(-2) @ S).squeeze(-2)
        elif self.form == "einsum-mulsum":
            for t in range(q.shape[1]):
                S = a[:, t, None, None] * S + torch.einsum("bk,bv->bkv", k[:, t], v[:, t])
                out[:, t] = (S * q[:, t][..., None]).sum(-2)
        else:  # a readout that is not S^T q: the generic scan, still exact
            for t in range(q.shape[1]):
                S = a[:, t, None, None] * S + k[:, t][..., None] * v[:, t][..., None, :]
                out[:, t] = S.sum(-2)
        return out, S


@pytest.mark.parametrize("form, routed", [("matmul", True), ("einsum-mulsum", True), ("other", False)])
def test_spellings(form, routed):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 29, d, dtype=F64) for d in (4, 4, 3))
    a = torch.rand(2, 29, dtype=F64)
    model = Spellings(form)
    fast = wavefront.optimize(model)
    (out, S), (ref, S_ref) = fast(q, k, v, a), model(q, k, v, a)
    assert_close(out, ref, 1e-12, f"{form} outputs")
    assert_close(S, S_ref, 1e-12, f"{form} final state")
    # the status line of this form's loop (statuses are kept per method, so per class)
    lines, first = inspect.getsourcelines(Spellings.forward)
    loops = [first + i for i, text in enumerate(lines) if "for t in range" in text]
    line = loops[["matmul", "einsum-mulsum", "other"].index(form)]
    status = next(x for x in _status(fast).splitlines() if f"line {line}:" in x)
    assert status.endswith(ROUTED if routed else "ran as a scan"), status
