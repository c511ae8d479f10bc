"""The chunked delta rule (WY form) and DeltaProduct against the step-by-step references: outputs,
final state, gradients, the matmul-only solve, long float32 runs with strong per-key-dim gates."""
import pytest
import torch
import torch.nn.functional as F
from wavefront.backends.scans.delta.chunked import (
    chunked_delta_product,
    chunked_delta_rule,
)
from wavefront.backends.scans.delta.naive import (
    delta_product_reference,
    delta_rule_reference,
)

from wavefront.testing import assert_close

F64 = torch.float64
GATES = [None, "scalar", "per_dim"]


def _inputs(gate, lead, T, dk, dv, n_h=None, dtype=F64, seed=0):
    """Realistic inputs: l2-normalised keys, beta = sigmoid(.) in (0, 1), g = log sigmoid(x),
    x ~ N(0, 2^2) (one per step, or one per step and key dim); n_h adds DeltaProduct's factor axis."""
    gen = torch.Generator().manual_seed(seed)
    f = () if n_h is None else (n_h,)
    q = torch.randn(*lead, T, dk, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(*lead, T, *f, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(*lead, T, *f, dv, generator=gen, dtype=dtype)
    beta = torch.sigmoid(torch.randn(*lead, T, *f, generator=gen, dtype=dtype))
    g = None if gate is None else F.logsigmoid(
        2 * torch.randn(*lead, T, *((dk,) if gate == "per_dim" else ()), generator=gen, dtype=dtype))
    return q, k, v, beta, g


def _values_and_grads(fn, q, k, v, beta, g, S0, **kw):
    leaves = [x for x in (q, k, v, beta, g, S0) if x is not None]
    o, S = fn(q, k, v, beta, g, S0, **kw)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=o.dtype)
    grads = torch.autograd.grad((o * w).sum() + (S * S).sum(), leaves)
    return o, S, grads


def _compare(fn, ref, args, rtol, **kw):
    args = [None if x is None else x.detach().clone().requires_grad_() for x in args]
    o, S, grads = _values_and_grads(fn, *args, **kw)
    ro, rS, rgrads = _values_and_grads(ref, *args)
    assert_close(o, ro, rtol, "outputs")
    assert_close(S, rS, rtol, "final state")
    names = [n for n, x in zip(["q", "k", "v", "beta", "g", "S0"], args) if x is not None]
    assert len(grads) == len(names)
    for name, x, y in zip(names, grads, rgrads):
        assert_close(x, y, rtol, f"gradient w.r.t. {name}")


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T", [1, 7, 64, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_the_reference_in_float64_values_and_gradients(gate, T, with_state):
    q, k, v, beta, g = _inputs(gate, (2, 3), T, 5, 4, seed=T)
    S0 = torch.randn(2, 3, 5, 4, dtype=F64) if with_state else None
    _compare(chunked_delta_rule, delta_rule_reference, (q, k, v, beta, g, S0), 1e-10, chunk=16)


@pytest.mark.parametrize("chunk", [1, 3, 16, 50])
@pytest.mark.parametrize("gate", GATES)
def test_any_chunk_size_and_the_default(chunk, gate):
    q, k, v, beta, g = _inputs(gate, (2,), 37, 4, 3, seed=chunk)
    ro, rS = delta_rule_reference(q, k, v, beta, g)
    for c in (chunk, None):
        o, S = chunked_delta_rule(q, k, v, beta, g, chunk=c)
        assert_close(o, ro, 1e-12, f"outputs, chunk {c}")
        assert_close(S, rS, 1e-12, f"final state, chunk {c}")


@pytest.mark.parametrize("n_h", [2, 3])
@pytest.mark.parametrize("gate", GATES)
def test_delta_product_matches_its_reference(n_h, gate):
    q, k, v, beta, g = _inputs(gate, (2, 3), 23, 5, 4, n_h=n_h, seed=n_h)
    S0 = torch.randn(2, 3, 5, 4, dtype=F64)
    _compare(chunked_delta_product, delta_product_reference, (q, k, v, beta, g, S0), 1e-10, chunk=16)


def test_delta_product_with_one_factor_is_the_delta_rule():
    q, k, v, beta, g = _inputs("scalar", (2,), 30, 4, 3, n_h=1)
    o, S = chunked_delta_product(q, k, v, beta, g, chunk=8)
    ro, rS = delta_rule_reference(q, k[..., 0, :], v[..., 0, :], beta[..., 0], g)
    assert_close(o, ro, 1e-12, "outputs")
    assert_close(S, rS, 1e-12, "final state")


@pytest.mark.parametrize("gate", GATES)
def test_the_matmul_only_solve_agrees_with_the_triangular_solve(gate, monkeypatch):
    q, k, v, beta, g = _inputs(gate, (2, 3), 100, 5, 4, seed=3)
    S0 = torch.randn(2, 3, 5, 4, dtype=F64)
    args = [x.requires_grad_() for x in (q, k, v, beta, g, S0) if x is not None]
    for chunk in (16, 13):  # a power of two and not
        o, S, grads = _values_and_grads(chunked_delta_rule, q, k, v, beta, g, S0, chunk=chunk)

        def refuse(*a, **kw):
            raise AssertionError("the matmul-only solve called solve_triangular")
        with monkeypatch.context() as m:
            m.setattr(torch.linalg, "solve_triangular", refuse)
            mo, mS, mgrads = _values_and_grads(chunked_delta_rule, q, k, v, beta, g, S0, chunk=chunk,
                                               solve="matmul")
        assert_close(mo, o, 1e-12, "outputs")
        assert_close(mS, S, 1e-12, "final state")
        assert len(mgrads) == len(args)
        for x, y in zip(mgrads, grads):
            assert_close(x, y, 1e-10, "gradient")


@pytest.mark.parametrize("gate, chunk", [("strong_per_dim", None), ("strong_per_dim", 64), ("per_dim", None),
                                         ("per_dim", 64), ("scalar", None)])
def test_float32_long_sequences_stay_finite_and_close(gate, chunk):
    q, k, v, beta, g = _inputs("scalar" if gate == "scalar" else "per_dim", (2,), 2048, 16, 16, seed=7)
    if gate == "strong_per_dim":
        g = torch.full_like(g, -5.0)  # exp(-cumulative g) over 64 steps would be e^320: overflow
    S0 = torch.randn(2, 16, 16, dtype=F64)
    o, S = chunked_delta_rule(*(x.float() for x in (q, k, v, beta, g, S0)), chunk=chunk)
    assert o.dtype == S.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    ro, rS = delta_rule_reference(*(x.float().double() for x in (q, k, v, beta, g, S0)))
    assert_close(o, ro, 1e-4, "fp32 outputs")
    assert_close(S, rS, 1e-4, "fp32 state")


def test_bfloat16_in_bfloat16_out_accumulating_in_float32():
    q, k, v, beta, g = _inputs("per_dim", (2,), 200, 8, 8)
    bf = [x.bfloat16() for x in (q, k, v, beta, g)]
    o, S = chunked_delta_rule(*bf)
    assert o.dtype == S.dtype == torch.bfloat16
    ro, rS = delta_rule_reference(*(x.double() for x in bf))
    assert_close(o.double(), ro, 2e-2, "bf16 outputs")
    assert_close(S.double(), rS, 2e-2, "bf16 state")


def test_an_empty_sequence_returns_the_initial_state():
    q, k, v, beta, g = _inputs("scalar", (2,), 0, 3, 4)
    S0 = torch.randn(2, 3, 4, dtype=F64)
    o, S = chunked_delta_rule(q, k, v, beta, g, S0)
    assert o.shape == (2, 0, 4)
    assert torch.equal(S, S0)


def test_bad_shapes_are_refused_with_the_shapes():
    q, k, v, beta, g = _inputs("scalar", (2,), 10, 3, 4)
    with pytest.raises(ValueError, match="q, k must be"):
        chunked_delta_rule(q, k[..., :2], v, beta, g)
    with pytest.raises(ValueError, match="beta must be"):
        chunked_delta_rule(q, k, v, beta[..., :5], g)
    with pytest.raises(ValueError, match="g must be"):
        chunked_delta_rule(q, k, v, beta, g[..., :5])
    with pytest.raises(ValueError, match="S0 must be"):
        chunked_delta_rule(q, k, v, beta, g, torch.zeros(2, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match="solve must be"):
        chunked_delta_rule(q, k, v, beta, g, solve="inverse")
    with pytest.raises(ValueError, match="k \\[..., T, n_h, dk\\]"):
        chunked_delta_product(q, k, v, beta, g)
