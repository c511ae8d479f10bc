"""The native CPU delta-rule kernel against the step-by-step reference (float64 and float32, every
gate, with and without an initial state), and the dispatch that picks it for inference only."""
import pytest
import torch
import torch.nn.functional as F
import wavefront.backends.scans.delta.dispatch as dispatch
import wavefront.backends.scans.delta.native as native
from wavefront.backends.scans.delta.dispatch import delta_rule
from wavefront.backends.scans.delta.naive import delta_rule_reference

from wavefront.testing import assert_close

F64 = torch.float64
GATES = [None, "scalar", "per_dim"]


@pytest.fixture(autouse=True)
def _built():
    if native.library() is None:
        pytest.skip(f"the native delta kernel cannot be built here: {native.KERNEL.error}")


def _inputs(gate, lead, T, dk, dv, dtype=F64, seed=0):
    """Realistic inputs: l2-normalised keys, beta = sigmoid(.) in (0, 1), g = log sigmoid(x),
    x ~ N(0, 2^2) (one per step, or one per step and key dim), an initial state ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, T, dk, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(*lead, T, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(*lead, T, dv, generator=gen, dtype=dtype)
    beta = torch.sigmoid(torch.randn(*lead, T, generator=gen, dtype=dtype))
    g = None if gate is None else F.logsigmoid(
        2 * torch.randn(*lead, T, *((dk,) if gate == "per_dim" else ()), generator=gen, dtype=dtype))
    S0 = torch.randn(*lead, dk, dv, generator=gen, dtype=dtype)
    return q, k, v, beta, g, S0


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_the_native_kernel_equals_the_reference(gate, T, with_state, dtype):
    q, k, v, beta, g, S0 = _inputs(gate, (2, 3), T, 5, 4, dtype=dtype, seed=T)
    S0 = S0 if with_state else None
    o, S = native.native_delta_rule(q, k, v, beta, g, S0)
    ro, rS = delta_rule_reference(q, k, v, beta, g, S0)
    assert o.dtype == S.dtype == dtype and o.shape == ro.shape and S.shape == rS.shape
    tol = 1e-12 if dtype == F64 else 1e-5
    assert_close(o, ro, tol, "outputs")
    assert_close(S, rS, tol, "last state")


@pytest.mark.parametrize("gate", GATES)
def test_wider_states_and_non_contiguous_inputs(gate):
    """dk != dv, dims past a vector width, and inputs that are transposed views ([B, T, H, d] read
    as [B, H, T, d], as attention layouts hand them over)."""
    q, k, v, beta, g, S0 = _inputs(gate, (2, 3), 50, 19, 33)
    t = lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731 (same values, strided)
    args = [t(x) for x in (q, k, v)] + [beta.transpose(1, 2).contiguous().transpose(1, 2),
                                        None if g is None else t(g) if g.dim() == 4 else g, S0]
    assert not args[0].is_contiguous()
    o, S = native.native_delta_rule(*args)
    ro, rS = delta_rule_reference(q, k, v, beta, g, S0)
    assert_close(o, ro, 1e-12, "outputs")
    assert_close(S, rS, 1e-12, "last state")


def test_a_long_float32_run_with_strong_gates_stays_close():
    """2048 steps of per-key-dim gates down to exp(-10): no overflow, no drift past float32's."""
    q, k, v, beta, g, S0 = _inputs("per_dim", (1, 2), 2048, 16, 16, dtype=F64, seed=3)
    o, S = native.native_delta_rule(*(x.float() for x in (q, k, v, beta, g, S0)))
    ro, rS = delta_rule_reference(q, k, v, beta, g, S0)
    assert_close(o, ro, 1e-5, "outputs")
    assert_close(S, rS, 1e-5, "last state")


def test_no_steps_returns_the_initial_state():
    q, k, v, beta, g, S0 = _inputs("scalar", (2,), 0, 3, 4)
    o, S = native.native_delta_rule(q, k, v, beta, g, S0)
    assert o.shape == (2, 0, 4) and torch.equal(S, S0)
    o, S = native.native_delta_rule(q, k, v, beta)
    assert torch.equal(S, torch.zeros(2, 3, 4, dtype=F64))


def test_refuses_what_it_does_not_cover():
    q, k, v, beta, g, S0 = _inputs("scalar", (2,), 5, 3, 4)
    assert native.applies(q, k, v, beta, g, S0)
    assert not native.applies(q.half(), k.half(), v.half(), beta.half(), g.half(), S0.half())
    assert not native.applies(q, k, v, beta.float(), g, S0)  # mixed dtypes
    with pytest.raises(TypeError, match="float32/float64 CPU tensors of one dtype"):
        native.native_delta_rule(q.half(), k.half(), v.half(), beta.half())
    with pytest.raises(TypeError, match="one dtype"):
        native.native_delta_rule(q, k, v, beta, g.float())
    with pytest.raises(ValueError, match="beta must be"):
        native.native_delta_rule(q, k, v, beta[..., :3])


def _counting(monkeypatch):
    calls = []
    real_native, real_chunked = native.native_delta_rule, dispatch.chunked_delta_rule
    monkeypatch.setattr(native, "native_delta_rule", lambda *a, **kw: calls.append("native") or real_native(*a, **kw))
    monkeypatch.setattr(dispatch, "chunked_delta_rule",
                        lambda *a, **kw: calls.append(("chunked", kw.get("solve"))) or real_chunked(*a, **kw))
    return calls


@pytest.mark.parametrize("gate", GATES)
def test_the_dispatch_picks_native_for_inference_and_chunked_for_gradients(gate, monkeypatch):
    q, k, v, beta, g, S0 = _inputs(gate, (2, 3), 37, 5, 4)
    calls = _counting(monkeypatch)
    o, S = delta_rule(q, k, v, beta, g, S0)  # no gradient needed: the native kernel
    assert calls == ["native"]
    ro, rS = delta_rule_reference(q, k, v, beta, g, S0)
    assert_close(o, ro, 1e-12, "outputs")
    assert_close(S, rS, 1e-12, "last state")
    with torch.no_grad():  # requires_grad but no autograd: still inference
        delta_rule(q.clone().requires_grad_(), k, v, beta, g, S0)
    assert calls == ["native"] * 2
    qg = q.clone().requires_grad_()
    o, S = delta_rule(qg, k, v, beta, g, S0)  # gradients: the chunked form
    (o.sum() + S.sum()).backward()
    assert calls[2:] == [("chunked", "triangular")] and qg.grad is not None
    delta_rule(q, k, v, beta, g, S0, method="chunked", solve="matmul")
    assert calls[3:] == [("chunked", "matmul")]
    delta_rule(q.half(), k.half(), v.half(), beta.half(), None if g is None else g.half(), S0.half())
    assert calls[4:] == [("chunked", "triangular")]  # float16: native does not apply


def test_native_with_gradients_and_unknown_methods_are_refused():
    q, k, v, beta, g, S0 = _inputs("scalar", (2,), 5, 3, 4)
    with pytest.raises(ValueError, match="forward only"):
        delta_rule(q.requires_grad_(), k, v, beta, g, S0, method="native")
    with pytest.raises(ValueError, match="unknown method 'triton'.*'auto', 'native' or 'chunked'"):
        delta_rule(q, k, v, beta, g, S0, method="triton")
    with pytest.raises(ValueError, match="solve must be one of"):
        delta_rule(q, k, v, beta, g, S0, solve="cholesky")


def test_under_export_the_dispatch_uses_the_matmul_solve(monkeypatch):
    q, k, v, beta, g, S0 = _inputs("scalar", (2,), 9, 3, 4)
    calls = _counting(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert not native.applies(q, k, v, beta, g, S0)
    o, S = delta_rule(q, k, v, beta, g, S0)
    assert calls == [("chunked", "matmul")]
    ro, rS = delta_rule_reference(q, k, v, beta, g, S0)
    assert_close(o, ro, 1e-12, "outputs")
